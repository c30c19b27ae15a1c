"""FastAPI REST - Part 4: JWT authentication and role-based authorization.

The whole app, in the order of lesson.md: `python steps.py 2.1` prints it as it stands after 2.1.
"""

# --- 0 Imports ---

import argparse  # 5
import asyncio  # 7
import enum
import getpass  # 13
import hashlib  # 8
import ipaddress  # 7
import logging  # 8
import math  # 7
import os  # 12
import re  # 10
import secrets  # 8
import sqlite3  # 1.3
import sys  # 13
import tempfile  # 13
import time  # 7
import traceback  # 13
import unicodedata  # 11
from concurrent.futures import ThreadPoolExecutor  # 12
from contextlib import asynccontextmanager
from contextlib import nullcontext  # 12
from datetime import datetime
from datetime import timedelta  # 1.2
from datetime import timezone
from pathlib import Path
from typing import Annotated
from typing import NoReturn  # 8
from urllib.parse import urlsplit  # 11

import asyncpg  # 1.3
import databases
import jwt  # 1.2
import psycopg  # 13
import sqlalchemy
from decouple import Config
from decouple import RepositoryEmpty
from decouple import RepositoryEnv
from fastapi import Depends  # 2.2
from fastapi import FastAPI
from fastapi import HTTPException  # 1.3
from fastapi import Request  # 2.1
from fastapi import Response  # 9
from fastapi import status  # 1.3
from fastapi.encoders import jsonable_encoder  # 9
from fastapi.exceptions import RequestValidationError  # 7
from fastapi.responses import JSONResponse  # 9
from fastapi.security import HTTPBearer  # 2.1
from fastapi_offline import FastAPIOffline
from passlib.context import CryptContext
from pydantic import AfterValidator  # 10
from pydantic import BaseModel
from pydantic import EmailStr
from pydantic import Field
from pydantic import TypeAdapter  # 11
from pydantic import ValidationError  # 11
from pydantic import field_validator
from sqlalchemy.dialects import postgresql  # 7
from sqlalchemy.dialects import sqlite  # 7
from zxcvbn import zxcvbn  # 7


# --- 0 Settings ---

BASE_DIR = Path(__file__).resolve().parent

# The .env beside this file, if any, wherever uvicorn starts; environment variables win.
ENV_FILE = BASE_DIR / ".env"
config = Config(RepositoryEnv(ENV_FILE) if ENV_FILE.exists() else RepositoryEmpty())


def refuse_to_start(message: str) -> NoReturn:  # 13
    # Something the person starting the app must fix: one clear message, no traceback.
    # Exit status 3 is uvicorn's "cannot start": with --workers, its supervisor stops.
    print(message, file=sys.stderr)
    raise SystemExit(3)


def number_setting(name: str, default: int, low: int, high: int) -> int:  # 15
    # "abc", "0" or "-5" stops the app with one line that says what the setting accepts.
    text = config(name, default=str(default)).strip()
    if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        refuse_to_start(f"{name} must be a whole number from {low} to {high}, not {text!r}.")
    return int(text)


def checked_database_url(url: str) -> str:  # 15
    try:
        driver = sqlalchemy.make_url(url).drivername
    except sqlalchemy.exc.ArgumentError:
        driver = None
    if driver not in ("sqlite", "postgresql"):
        # Without the value: a database URL may hold a password.
        refuse_to_start(
            "DATABASE_URL must be sqlite:///path/to/file.db or "
            "postgresql://user:password@host/database."
        )
    return url


DATABASE_URL = checked_database_url(
    config("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'clothes.db'}")
)
BCRYPT_ROUNDS = number_setting("BCRYPT_ROUNDS", 12, low=4, high=31)
DATABASE_WAIT_SECONDS = 5  # 15


# --- 0 Enums ---


class ColorEnum(enum.Enum):
    pink = "pink"
    black = "black"
    white = "white"
    yellow = "yellow"


class SizeEnum(enum.Enum):
    xs = "xs"
    s = "s"
    m = "m"
    l = "l"  # noqa: E741 - the clothes size "L"
    xl = "xl"
    xxl = "xxl"


class UserRolesEnum(enum.Enum):  # 3.1
    super_admin = "super_admin"
    admin = "admin"
    user = "user"


# --- 0 Tables ---


def database_options() -> dict:  # 15
    if DATABASE_URL.startswith("sqlite"):
        # SQLite's busy timeout: how long a write waits while another holds the lock.
        return {"timeout": DATABASE_WAIT_SECONDS}
    # PostgreSQL: how long to connect, and how long a query may take, waits for locks too.
    # min_size 0: no connections kept for nothing, which asyncpg would reconnect in the
    # background while the database is away, logging a traceback each time.
    return {
        "timeout": DATABASE_WAIT_SECONDS,
        "min_size": 0,
        "server_settings": {"statement_timeout": str(DATABASE_WAIT_SECONDS * 1000)},
    }


database = databases.Database(DATABASE_URL, **database_options())
metadata = sqlalchemy.MetaData()
# A plain (not async) engine, for create_all and the admin command.
engine = sqlalchemy.create_engine(DATABASE_URL)


def timestamp_columns() -> list[sqlalchemy.Column]:
    # A column belongs to one table, so every table gets a fresh pair.
    return [
        sqlalchemy.Column(
            "created_at",
            sqlalchemy.DateTime(timezone=True),
            nullable=False,
            server_default=sqlalchemy.func.now(),
        ),
        sqlalchemy.Column(
            "last_modified_at",
            sqlalchemy.DateTime(timezone=True),
            nullable=False,
            server_default=sqlalchemy.func.now(),
            onupdate=sqlalchemy.func.now(),
        ),
    ]


users = sqlalchemy.Table(
    "users",
    metadata,
    sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
    sqlalchemy.Column("email", sqlalchemy.String(120), unique=True, nullable=False),
    sqlalchemy.Column("password", sqlalchemy.String(255), nullable=False),
    sqlalchemy.Column("full_name", sqlalchemy.String(200)),
    sqlalchemy.Column("phone", sqlalchemy.String(13)),
    *timestamp_columns(),
    sqlalchemy.Column(  # 3.1
        # The database fills in "user", so nobody becomes an admin by accident.
        "role",
        sqlalchemy.Enum(UserRolesEnum, name="user_role"),
        nullable=False,
        server_default=UserRolesEnum.user.name,
    ),
    sqlalchemy.Column("token_version", sqlalchemy.Integer, nullable=False, server_default="0"),  # 6
    # Without it SQLite hands a deleted user's id, and so their tokens, to the next user.
    sqlite_autoincrement=True,
)

clothes = sqlalchemy.Table(
    "clothes",
    metadata,
    sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
    sqlalchemy.Column("name", sqlalchemy.String(120), nullable=False),
    sqlalchemy.Column("color", sqlalchemy.Enum(ColorEnum), nullable=False),
    sqlalchemy.Column("size", sqlalchemy.Enum(SizeEnum), nullable=False),
    sqlalchemy.Column("photo_url", sqlalchemy.String(255), nullable=False),
    *timestamp_columns(),
)


# --- 0 Schemas ---


def fits_bcrypt(password: str) -> str:  # 10
    # bcrypt refuses more than 72 bytes and NUL characters: a 422 here, not a 500 later.
    if len(password.encode()) > 72:
        raise ValueError("password must be at most 72 bytes")
    if "\x00" in password:
        raise ValueError("password must not contain NUL characters")
    return password


# bcrypt refuses a password over 72 bytes; a new one needs 8 characters or more.
Password = Annotated[str, AfterValidator(fits_bcrypt)]
NewPassword = Annotated[str, Field(min_length=8), AfterValidator(fits_bcrypt)]
# Stored lowercased, so Ada@example.com and ada@example.com are one account. The length
# is checked after: a few letters grow when lowercased ("İ" becomes two characters).
Email = Annotated[EmailStr, AfterValidator(str.lower), Field(max_length=120)]


def no_control_characters(text: str) -> str:  # 10
    # NUL, tab, newline and the other C0 controls have no place in a name or a phone
    # number, and PostgreSQL refuses NUL outright: a 422 here, not a 500 there.
    # Nor do Unicode's other controls (Cc), its invisible formats (Cf: the right-to-left
    # override shows "\u202egnp.exe" as "exe.png"), or its line separators (Zl, Zp). Only
    # the zero-width joiners stay, U+200C and U+200D: Persian names and emoji need them.
    categories = ("Cc", "Cf", "Zl", "Zp")
    hidden = {character for character in text if unicodedata.category(character) in categories}
    if hidden - {"\u200c", "\u200d"}:
        raise ValueError("must not contain control characters")
    # Half a UTF-16 pair ("\ud800") is valid JSON, and a command-line argument can carry
    # one too: no database can store it.
    if any("\ud800" <= character <= "\udfff" for character in text):
        raise ValueError("must be valid Unicode text")
    return text


PlainText = Annotated[str, AfterValidator(no_control_characters)]  # 10


class UserSignIn(BaseModel):
    # The limits match the columns, so a long value is a 422, not a database error.
    email: Email
    password: NewPassword
    full_name: PlainText = Field(min_length=1, max_length=200)
    phone: PlainText | None = Field(default=None, max_length=13)


class ClothesBase(BaseModel):
    name: str = Field(min_length=1, max_length=120)
    photo_url: str = Field(max_length=255)
    size: SizeEnum
    color: ColorEnum


class ClothesOut(ClothesBase):
    id: int
    created_at: datetime
    last_modified_at: datetime

    # SQLite returns UTC without saying so: attach the offset ("2026-11-28T15:00:00Z").
    @field_validator("created_at", "last_modified_at")
    @classmethod
    def in_utc(cls, moment: datetime) -> datetime:
        if moment.tzinfo is None:
            return moment.replace(tzinfo=timezone.utc)
        return moment.astimezone(timezone.utc)


# --- 0 Password hashing ---

pwd_context = CryptContext(schemes=["bcrypt"], bcrypt__rounds=BCRYPT_ROUNDS)


# --- 0 App ---


@asynccontextmanager
async def lifespan(app: FastAPI):
    await database.connect()
    yield
    await database.disconnect()
    engine.dispose()


class ErrorOut(BaseModel):  # 14
    """The body of every error answer: what went wrong, in words."""

    detail: str


def error_answer(status_code: int, description: str) -> dict:  # 14
    return {status_code: {"model": ErrorOut, "description": description}}


DATABASE_AWAY = error_answer(  # 15
    status.HTTP_503_SERVICE_UNAVAILABLE,
    "The database is not answering: try again after Retry-After",
)


# FastAPIOffline: FastAPI with the files of /docs served by the app, so they work offline.
app = FastAPIOffline(
    title="Clothes shop - JWT authentication and roles",
    description="Register or log in, click **Authorize** and paste the token.",
    lifespan=lifespan,
    redoc_url=None,  # /redoc loads a logo from another host
    responses=DATABASE_AWAY,  # 15
)


# --- 1.2 Encode a token ---


def load_or_create_secret(path: Path) -> str:  # 13
    """The secret kept in path. The first start makes it; every later start reads it."""
    if not path.exists():
        # Write it whole under another name (mkstemp: mode 0600), then link it to path. link
        # fails if path exists: of workers starting at once one wins, none reads half a file.
        handle, temporary = tempfile.mkstemp(prefix=path.name, dir=path.parent)
        with os.fdopen(handle, "w") as file:
            file.write(secrets.token_urlsafe(32))
        try:
            os.link(temporary, path)
            logging.getLogger(__name__).warning(
                f"JWT_SECRET is not set: made a random one and kept it in {path}. "
                "A real deployment sets JWT_SECRET instead."
            )
        except FileExistsError:
            pass  # another worker was first: everybody uses its secret
        finally:
            os.remove(temporary)
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        refuse_to_start(
            f"Cannot read the secret kept in {path} ({error}). Delete the file to make a "
            "new one (tokens signed with the old one stop working), or set JWT_SECRET."
        )


JWT_SECRET = config("JWT_SECRET", default="")
JWT_EXPIRES_MINUTES = number_setting("JWT_EXPIRES_MINUTES", 120, low=1, high=24 * 60)

if not JWT_SECRET:  # 13
    # A fresh clone must run, and its tokens must survive restarts and work in every worker.
    JWT_SECRET = load_or_create_secret(BASE_DIR / ".jwt_secret")
if len(JWT_SECRET.encode()) < 32:
    # HS256 needs a key of at least 256 bits (RFC 7518, section 3.2).
    refuse_to_start(
        "JWT_SECRET is missing or too short: use at least 32 bytes. Make one with\n"
        '    python -c "import secrets; print(secrets.token_urlsafe(32))"'
    )


def create_access_token(user) -> str:
    # user is a row of the users table. PyJWT 2.10+ insists that "sub" is a string.
    payload = {
        "sub": str(user["id"]),
        "exp": datetime.now(timezone.utc) + timedelta(minutes=JWT_EXPIRES_MINUTES),
        "ver": user["token_version"],  # 6
    }
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


# --- 1.3 Register returns a token ---


class TokenOut(BaseModel):
    token: str
    refresh_token: str  # 8


def no_store(response: Response) -> None:  # 9
    # A token works like a password: no browser or proxy may keep a copy (RFC 6749, 5.1).
    response.headers["Cache-Control"] = "no-store"


BAD_BODY = error_answer(  # 14
    status.HTTP_400_BAD_REQUEST, "A body that cannot be read as JSON text"
)
NOT_AUTHENTICATED = error_answer(  # 14
    status.HTTP_401_UNAUTHORIZED, "No token, or a token that is expired or invalid"
)
NOT_ALLOWED = error_answer(  # 14
    status.HTTP_403_FORBIDDEN, "A valid token, but the user's role may not do this"
)
TOO_LARGE = error_answer(status.HTTP_413_CONTENT_TOO_LARGE, "A request body over 64 KiB")  # 14
TOO_MANY_FAILURES = error_answer(  # 14
    status.HTTP_429_TOO_MANY_REQUESTS, "Too many failed logins: try again after Retry-After seconds"
)
BUSY = error_answer(  # 14
    status.HTTP_503_SERVICE_UNAVAILABLE,
    "Too many passwords to check, or the database not answering: try again after Retry-After",
)


@app.post(
    "/register",
    status_code=status.HTTP_201_CREATED,
    response_model=TokenOut,
    dependencies=[Depends(no_store)],  # 9
    responses={  # 14
        **BAD_BODY,
        **error_answer(status.HTTP_409_CONFLICT, "Email taken"),
        **TOO_LARGE,
        **TOO_MANY_FAILURES,
        **BUSY,
    },
    tags=["1 · JWT"],  # 14
    summary="1.3 Register a user and get a token",  # 14
)
async def create_user(user: UserSignIn, request: Request):
    await refuse_easy_password(request, "password", user.password)  # 7
    address = client_address(request)
    # A sign-up is claimed like a login: probing which emails are taken (409) counts as
    # failing, and meets the limits of section 7.
    await claim_attempt(request, user.email, address)
    values = user.model_dump()
    values["password"] = await run_hashing(request, pwd_context.hash, user.password)
    # Everything a sign-up writes is stored together, or not at all.
    async with database.transaction():
        try:
            id_ = await database.execute(users.insert().values(**values))
        except Exception as error:
            if not is_email_taken(error):
                raise
            # The unique column decides, so two requests at once cannot both win.
            raise HTTPException(status.HTTP_409_CONFLICT, "A user with this email already exists.")
        new_user = await database.fetch_one(users.select().where(users.c.id == id_))
        refresh_token = await start_session(new_user)
        # Counted before its claim goes: sign-ups at once never find the address's count low.
        await count_sign_up(address)
        await forget_failures(user.email, address)
        await remember_login(user.email, address)
    return {"token": create_access_token(new_user), "refresh_token": refresh_token}


# --- 2.1 The custom HTTPBearer class ---


def unauthorized(detail: str) -> HTTPException:
    # 401 means "who are you?"; the header tells the client to send a Bearer token.
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"}
    )


async def one_connection():  # 12
    # databases keeps one connection per asyncio task, and FastAPI runs the dependencies
    # and the route in the request's task: until the response is sent, their queries
    # all use this connection, instead of opening one each.
    async with database.connection():
        yield


class CustomHTTPBearer(HTTPBearer):
    # Depends(one_connection): the user lookup and the route's queries share one connection.
    async def __call__(
        self, request: Request, connection: Annotated[None, Depends(one_connection)]
    ) -> dict:
        if len(request.headers.getlist("Authorization")) > 1:  # 10
            # With two Authorization headers, which one counts depends on who reads them.
            raise unauthorized("Send one Authorization header.")
        # No Bearer token at all: the base class answers 401 "Not authenticated".
        res = await super().__call__(request)
        try:
            payload = jwt.decode(
                res.credentials,
                JWT_SECRET,
                algorithms=["HS256"],
                options={"require": ["exp", "sub"]},
            )
        # ExpiredSignatureError is a kind of InvalidTokenError, so it comes first.
        except jwt.ExpiredSignatureError:
            raise unauthorized("Token expired.")
        except jwt.InvalidTokenError:
            raise unauthorized("Invalid token.")
        if not is_user_id(payload["sub"]):  # 10
            raise unauthorized("Invalid token.")
        user = await database.fetch_one(users.select().where(users.c.id == int(payload["sub"])))
        # The user may have been deleted since.
        if user is None:
            raise unauthorized("Invalid token.")
        if payload.get("ver") != user["token_version"]:  # 6
            # A logout or a new password since this token was made took it back.
            raise unauthorized("Token revoked.")
        request.state.user = user
        return payload


# The tutorial's name: it checks Bearer tokens, it does not speak OAuth2.
oauth2_scheme = CustomHTTPBearer(bearerFormat="JWT")


# --- 2.2 Protect GET /clothes/ ---


@app.get(
    "/clothes/",
    response_model=list[ClothesOut],
    dependencies=[Depends(oauth2_scheme)],
    responses=NOT_AUTHENTICATED,  # 14
    tags=["2 · Authentication"],  # 14
    summary="2.2 List clothes (any logged-in user)",  # 14
)
async def get_all_clothes():
    return await database.fetch_all(clothes.select())


# --- 3.2 The is_admin dependency ---


# Depending on oauth2_scheme, is_admin always runs after the token check:
# no token is a 401 (who are you?), the wrong role a 403 (not allowed).
async def is_admin(request: Request, payload: Annotated[dict, Depends(oauth2_scheme)]):
    # The user was just loaded from the database: a demoted admin is refused at once.
    if request.state.user["role"] not in (UserRolesEnum.admin, UserRolesEnum.super_admin):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "You do not have permissions for this resource"
        )


def is_web_address(url: str) -> str:  # 11
    # Every user sees photo_url, maybe as a link: http and https only, no javascript:.
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL")
    return url


class ClothesIn(ClothesBase):
    # Checked on the way in only: rows stored before these rules still list.
    name: PlainText = Field(min_length=1, max_length=120)
    photo_url: Annotated[PlainText, AfterValidator(is_web_address)] = Field(max_length=255)


@app.post(
    "/clothes/",
    status_code=status.HTTP_201_CREATED,
    response_model=ClothesOut,
    dependencies=[Depends(is_admin)],
    responses={  # 14
        **BAD_BODY,
        **NOT_AUTHENTICATED,
        **NOT_ALLOWED,
        **TOO_LARGE,
    },
    tags=["3 · Authorization"],  # 14
    summary="3.2 Add clothes (admin and super_admin only)",  # 14
)
async def create_clothes(clothes_data: ClothesIn):
    id_ = await database.execute(clothes.insert().values(**clothes_data.model_dump()))
    return await database.fetch_one(clothes.select().where(clothes.c.id == id_))


# --- 4 Logging in ---


class UserLogin(BaseModel):
    email: Email
    password: Password


@app.post(
    "/login",
    response_model=TokenOut,
    dependencies=[Depends(no_store)],  # 9
    responses={  # 14
        **BAD_BODY,
        **error_answer(status.HTTP_401_UNAUTHORIZED, "Unknown email or wrong password"),
        **TOO_LARGE,
        **TOO_MANY_FAILURES,
        **BUSY,
    },
    tags=["4 · Logging in"],  # 14
    summary="4 Log in with email and password and get a token",  # 14
)
async def login(credentials: UserLogin, request: Request):
    address = client_address(request)  # 7
    await claim_attempt(request, credentials.email, address)  # 7
    user = await database.fetch_one(users.select().where(users.c.email == credentials.email))
    if user is None:
        # Hash anyway, so the response time does not tell which emails exist.
        password_ok = await run_hashing(request, pwd_context.dummy_verify)
    else:
        password = user["password"]
        password_ok = await run_hashing(request, pwd_context.verify, credentials.password, password)
    if not password_ok:
        raise unauthorized("Incorrect email or password.")
    await forget_failures(credentials.email, address)  # 7
    await remember_login(credentials.email, address)  # 7
    return {
        "token": create_access_token(user),
        "refresh_token": await start_session(user),
    }


# --- 5 Making an admin ---


def set_role_command(connection, args) -> str:
    result = connection.execute(
        users.update().where(users.c.email == args.email).values(role=UserRolesEnum[args.role])
    )
    if result.rowcount == 0:
        raise SystemExit(f"No user with email {args.email}.")
    return f"{args.email} is now {args.role}."


def logout_command(connection, args) -> str:  # 6
    result = connection.execute(
        users.update()
        .where(users.c.email == args.email)
        .values(token_version=users.c.token_version + 1)
    )
    if result.rowcount == 0:
        raise SystemExit(f"No user with email {args.email}.")
    return f"Every token of {args.email} is revoked."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Manage the lesson app's users.")
    commands = parser.add_subparsers(dest="command", required=True)
    roles = [role.name for role in UserRolesEnum]

    create = commands.add_parser(  # 13
        "create-user", help="create a user with a role; asks for the password"
    )
    create.add_argument("email")  # 13
    create.add_argument("--role", choices=roles, default="admin")  # 13
    create.add_argument("--full-name", default="Shop Admin")  # 13
    create.add_argument("--phone")  # 13
    create.set_defaults(handler=create_user_command)  # 13

    set_role = commands.add_parser("set-role", help="change an existing user's role")
    set_role.add_argument("email", type=email_address)
    set_role.add_argument("role", choices=roles)
    set_role.set_defaults(handler=set_role_command)

    logout_user = commands.add_parser("logout", help="revoke every token of a user")  # 6
    logout_user.add_argument("email", type=email_address)  # 6
    logout_user.set_defaults(handler=logout_command)  # 6

    args = parser.parse_args(argv)
    create_tables()  # the server may never have run yet
    check_columns()
    with engine.begin() as connection:
        print(args.handler(connection, args))


# --- 6 Log out and change the password ---


@app.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(oauth2_scheme)],
    responses=NOT_AUTHENTICATED,  # 14
    tags=["6 · Going further"],  # 14
    summary="6 Log out: every token of this user stops working",  # 14
)
async def logout(request: Request) -> None:
    # One UPDATE that counts up in the database: two logouts at once both count.
    await database.execute(
        users.update()
        .where(users.c.id == request.state.user["id"])
        .values(token_version=users.c.token_version + 1)
    )


class PasswordChange(BaseModel):
    old_password: Password
    new_password: NewPassword


@app.post(
    "/password",
    response_model=TokenOut,
    dependencies=[Depends(oauth2_scheme), Depends(no_store)],
    responses={  # 14
        **error_answer(
            status.HTTP_400_BAD_REQUEST,
            "Wrong old password, or a body that cannot be read as JSON text",
        ),
        **NOT_AUTHENTICATED,
        **TOO_LARGE,
        **TOO_MANY_FAILURES,
        **BUSY,
    },
    tags=["6 · Going further"],  # 14
    summary="6 Change the password: older tokens stop working, here is a new one",  # 14
)
async def change_password(change: PasswordChange, request: Request):
    user = request.state.user
    await refuse_easy_password(request, "new_password", change.new_password)  # 7
    address = client_address(request)  # 7
    await claim_attempt(request, user["email"], address)  # 7
    if not await run_hashing(request, pwd_context.verify, change.old_password, user["password"]):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Incorrect password.")
    await forget_failures(user["email"], address)  # 7
    await remember_login(user["email"], address)  # 7
    new_hash = await run_hashing(request, pwd_context.hash, change.new_password)
    # Only if the token is still current: a logout or another change may have come
    # while we were hashing. The check and the write are one statement, so no race.
    changed = await database.fetch_one(
        users.update()
        .where(users.c.id == user["id"], users.c.token_version == user["token_version"])
        .values(password=new_hash, token_version=users.c.token_version + 1)
        .returning(*users.c)
    )
    if changed is None:
        raise unauthorized("Token revoked.")
    return {
        "token": create_access_token(changed),
        "refresh_token": await start_session(changed),
    }


# --- 7 Slow down password guessing ---

FREE_FAILURES = 5  # for one email from one address, before the waits begin
MAX_WAIT_SECONDS = 15 * 60
MAX_FAILURES_PER_HOUR = 100  # for one email, and from one address (OWASP ASVS 2.2.1)

failed_logins = sqlalchemy.Table(
    "failed_logins",
    metadata,
    sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
    # The email as typed, with or without an account: the throttle must not tell which.
    sqlalchemy.Column("email", sqlalchemy.String(120), nullable=False, index=True),
    sqlalchemy.Column("address", sqlalchemy.String(45), nullable=False, index=True),
    # Seconds since 1970 (time.time()): plain numbers, the same on every database.
    sqlalchemy.Column("failed_at", sqlalchemy.Float, nullable=False, index=True),
)


def client_address(request: Request) -> str:
    # Behind a proxy this is the proxy's address, unless uvicorn is told to trust
    # the proxy's X-Forwarded-For header (--forwarded-allow-ips; lesson.md, Appendix C).
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:45]  # the column's length: the longest IPv6 address is 45 characters
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)  # an IPv4 client of a server listening on IPv6
        # One home or phone has a whole /64 of IPv6 addresses, each in many spellings.
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


async def failures_since(since: float, *where) -> tuple[int, float | None, float | None]:
    """How many failed logins match `where` since `since`; the first's and last's times."""
    row = await database.fetch_one(
        sqlalchemy.select(
            sqlalchemy.func.count(),
            sqlalchemy.func.min(failed_logins.c.failed_at),
            sqlalchemy.func.max(failed_logins.c.failed_at),
        ).where(failed_logins.c.failed_at > since, *where)
    )
    return row[0], row[1], row[2]


def too_many_failures(seconds: float) -> HTTPException:
    seconds = math.ceil(seconds)
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        f"Too many failed logins: try again in {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )


async def check_throttle(email: str, address: str, now: float, known: bool, *others) -> None:
    """Refuse with 429 while this login must wait. `others` picks the failures that count."""
    hour_ago = now - 3600
    by_email = failed_logins.c.email == email
    by_address = failed_logins.c.address == address
    in_a_row, _, last = await failures_since(hour_ago, by_email, by_address, *others)
    if in_a_row >= FREE_FAILURES:
        # 1 second after the 5th failure in a row, then 2, 4, 8 … up to 15 minutes.
        wait = min(2 ** (in_a_row - FREE_FAILURES), MAX_WAIT_SECONDS)
        if last + wait > now:
            raise too_many_failures(last + wait - now)
    # A login that succeeded from this address before is no stranger: the caps below, which
    # an attacker can fill, do not lock it out (OWASP's "device cookies", by address).
    if known:
        return
    # From every address, and for every email: each at most 100 an hour.
    for rule in (by_email, by_address):
        count, first, _ = await failures_since(hour_ago, rule, *others)
        if count >= MAX_FAILURES_PER_HOUR:
            raise too_many_failures(first + 3600 - now)  # when the oldest is an hour old


claims_one_at_a_time = asyncio.Lock()


async def claim_attempt(request: Request, email: str, address: str) -> None:
    """Count this login as failed before its hash, or refuse it with 429, before any hash.

    Written down first, checked second, in one transaction: guesses sent at the same
    moment cannot all pass a check that none of them has counted in yet.
    """
    now = time.time()
    known = await is_known_login(email, address, now)
    if known:  # 12
        request.state.known_login = (email, address)  # run_hashing lets it go ahead
    if no_place_in_line(request):  # 12
        # What run_hashing would refuse is refused before it is counted: a user
        # turned away by a busy server has not failed, and a flood writes nothing.
        raise await turned_away(request)
    if await request.is_disconnected():  # 12
        raise client_gone()
    # One claim at a time in this worker: a burst of hundreds would otherwise wait on
    # SQLite's write lock past its 5 seconds ("database is locked"). A claim is quick.
    async with held_within(claims_one_at_a_time, DATABASE_WAIT_SECONDS):
        async with database.transaction():  # a 429 rolls it back: a refusal is not counted
            if database.url.dialect == "postgresql":
                # One at a time per email and per address (SQLite: the INSERT locks the
                # file). Emails' locks are numbered 1, addresses' 2, then one from the text.
                for kind, key in ((1, email), (2, address)):
                    text_key = sqlalchemy.func.hashtext(key)
                    lock = sqlalchemy.func.pg_advisory_xact_lock(kind, text_key)
                    await database.fetch_val(sqlalchemy.select(lock))
            id_ = await database.execute(
                failed_logins.insert().values(email=email, address=address, failed_at=now)
            )
            await check_throttle(email, address, now, known, failed_logins.c.id != id_)
            # Only the last hour counts: older rows go, so the table does not grow forever.
            old = failed_logins.c.failed_at < now - 3600
            await database.execute(failed_logins.delete().where(old))
    request.state.claim = (id_, now)  # 12


# Who has logged in from where, in the last 30 days.
KNOWN_FOR_SECONDS = 30 * 24 * 3600
known_logins = sqlalchemy.Table(
    "known_logins",
    metadata,
    sqlalchemy.Column("email", sqlalchemy.String(120), primary_key=True),
    sqlalchemy.Column("address", sqlalchemy.String(45), primary_key=True),
    sqlalchemy.Column("logged_in_at", sqlalchemy.Float, nullable=False, index=True),
)


async def is_known_login(email: str, address: str, now: float) -> bool:
    known = await database.fetch_val(
        sqlalchemy.select(sqlalchemy.func.count()).where(
            known_logins.c.email == email,
            known_logins.c.address == address,
            known_logins.c.logged_in_at > now - KNOWN_FOR_SECONDS,
        )
    )
    return known > 0


async def remember_login(email: str, address: str) -> None:
    now = time.time()
    # Insert, or update the time of a pair already known: each database says it its own way.
    dialect = postgresql if database.url.dialect == "postgresql" else sqlite
    insert = dialect.insert(known_logins).values(email=email, address=address, logged_in_at=now)
    await database.execute(
        insert.on_conflict_do_update(
            index_elements=["email", "address"], set_={"logged_in_at": now}
        )
    )
    old = known_logins.c.logged_in_at < now - KNOWN_FOR_SECONDS
    await database.execute(known_logins.delete().where(old))


async def forget_failures(email: str, address: str) -> None:
    # The right password: this email's failures from this address (this attempt too) go.
    forget = failed_logins.delete().where(
        failed_logins.c.email == email,
        failed_logins.c.address == address,
        failed_logins.c.failed_at <= time.time(),  # not the failures that come after
    )
    try:
        await database.execute(forget)
    except Exception as error:
        if is_database_away(error):
            # A right password must not stay counted as a failure: forget them later.
            write_when_back(forget)
        raise


def is_easy_to_guess(password: str) -> bool:
    # zxcvbn knows what people pick (leaked passwords, words, names, dates, keyboard
    # patterns); a score of 0 or 1 means guessed within about a million tries. Its l33t
    # matching can take a second on 72 well-chosen bytes: the first 32 are enough to judge.
    return zxcvbn(password[:32])["score"] < 2


async def refuse_easy_password(request: Request, field: str, password: str) -> None:
    # Up to a quarter of a second of work: in the hashing line, like a hash.
    if await run_hashing(request, is_easy_to_guess, password):
        message = "Value error, password is too common or too easy to guess"
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", field), "msg": message}]
        )


# --- 8 Refresh tokens ---

REFRESH_EXPIRES_DAYS = number_setting("REFRESH_EXPIRES_DAYS", 14, low=1, high=365)
# However often it is refreshed, a login lasts at most this long: then log in again.
SESSION_EXPIRES_DAYS = number_setting("SESSION_EXPIRES_DAYS", 30, low=1, high=365)

refresh_tokens = sqlalchemy.Table(
    "refresh_tokens",
    metadata,
    sqlalchemy.Column("id", sqlalchemy.Integer, primary_key=True),
    sqlalchemy.Column(
        "user_id",
        sqlalchemy.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    # Every token refreshed from one login shares that login's family.
    sqlalchemy.Column("family", sqlalchemy.String(32), nullable=False, index=True),
    # Only a SHA-256 of the token: a copy of the database holds no token that works.
    sqlalchemy.Column("token_hash", sqlalchemy.String(64), nullable=False, unique=True),
    # The user's token_version at login: a logout or a new password ends the family too.
    sqlalchemy.Column("token_version", sqlalchemy.Integer, nullable=False),
    sqlalchemy.Column(
        "created_at",
        sqlalchemy.DateTime(timezone=True),
        nullable=False,
        server_default=sqlalchemy.func.now(),
    ),
    sqlalchemy.Column("expires_at", sqlalchemy.DateTime(timezone=True), nullable=False),
    sqlalchemy.Column(
        "family_expires_at", sqlalchemy.DateTime(timezone=True), nullable=False, index=True
    ),
    sqlalchemy.Column("spent_at", sqlalchemy.DateTime(timezone=True)),
    sqlalchemy.Column("family_ended_at", sqlalchemy.DateTime(timezone=True)),
    sqlite_autoincrement=True,
)


def hash_refresh_token(token: str) -> str:
    # bcrypt is slow because people pick guessable passwords. Nobody can guess 32 random
    # bytes, so a fast hash is enough here: it only has to be one-way.
    return hashlib.sha256(token.encode()).hexdigest()


async def store_refresh_token(**values) -> str:
    """Make a refresh token, store its hash with these values, and return the token."""
    # The family first: a spent token whose row forget_spent_tokens removed still names it.
    token = f"{values['family']}.{secrets.token_urlsafe(32)}"
    token_hash = hash_refresh_token(token)
    await database.execute(refresh_tokens.insert().values(token_hash=token_hash, **values))
    return token


async def start_session(user) -> str:
    """The first refresh token of a new family, for a user who just proved who they are."""
    now = datetime.now(timezone.utc)
    # Expired families are of no use any more: each new session clears them away.
    await database.execute(refresh_tokens.delete().where(refresh_tokens.c.family_expires_at < now))
    token = await store_refresh_token(
        user_id=user["id"],
        family=secrets.token_hex(16),
        token_version=user["token_version"],
        expires_at=now + timedelta(days=REFRESH_EXPIRES_DAYS),
        family_expires_at=now + timedelta(days=SESSION_EXPIRES_DAYS),
    )
    await forget_oldest_sessions(user["id"])
    return token


class RefreshIn(BaseModel):
    refresh_token: PlainText = Field(max_length=1000)


def family_ended(family):
    """Is any row of this family ended? `family` is a family's name, or its column."""
    # Any row, not only this one: a refresh in flight when the family ended may have
    # stored a successor that the ending UPDATE did not see.
    ended = refresh_tokens.alias("ended")
    return sqlalchemy.exists().where(ended.c.family == family, ended.c.family_ended_at.is_not(None))


def spendable(token_hash: str, now: datetime) -> tuple:
    """Where a refresh token can be spent: unspent, unexpired, its family not ended, and
    made under the user's token_version of now."""
    current_version = (
        sqlalchemy.select(users.c.token_version)
        .where(users.c.id == refresh_tokens.c.user_id)
        .scalar_subquery()
    )
    return (
        refresh_tokens.c.token_hash == token_hash,
        refresh_tokens.c.spent_at.is_(None),
        ~family_ended(refresh_tokens.c.family),
        refresh_tokens.c.expires_at > now,
        refresh_tokens.c.family_expires_at > now,
        refresh_tokens.c.token_version == current_version,
    )


async def refuse_refresh(token_hash: str, now: datetime) -> NoReturn:
    """Answer 401 with the reason; a spent token that comes back ends its whole family."""
    token = await database.fetch_one(
        refresh_tokens.select().where(refresh_tokens.c.token_hash == token_hash)
    )
    if token is None:
        raise unauthorized("Invalid refresh token.")
    user = await database.fetch_one(users.select().where(users.c.id == token["user_id"]))
    if user is None:  # deleted since
        raise unauthorized("Invalid refresh token.")
    family_is_ended = await database.fetch_val(sqlalchemy.select(family_ended(token["family"])))
    if family_is_ended or token["token_version"] != user["token_version"]:
        raise unauthorized("Refresh token revoked.")
    if token["spent_at"] is not None:
        # Used twice: by its owner and by whoever copied it, we cannot tell which came first.
        # End the family, so that neither can go on (RFC 9700, section 4.14).
        await database.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.family == token["family"])
            .values(family_ended_at=now)
        )
        logging.getLogger(__name__).warning(
            f"A spent refresh token of user {user['id']} came back: "
            f"its family {token['family']} is ended."
        )
        raise unauthorized("Refresh token already used: log in again.")
    raise unauthorized("Refresh token expired: log in again.")


@app.post(
    "/refresh",
    response_model=TokenOut,
    dependencies=[Depends(no_store)],  # 9
    responses={  # 14
        **BAD_BODY,
        **error_answer(
            status.HTTP_401_UNAUTHORIZED,
            "A refresh token that is unknown, spent, expired or revoked",
        ),
        **TOO_LARGE,
        **error_answer(status.HTTP_429_TOO_MANY_REQUESTS, "Too many refreshes of one login"),
    },
    tags=["8 · Going further"],  # 14
    summary="8 Trade a refresh token for a new pair of tokens",  # 14
)
async def refresh(body: RefreshIn):
    now = datetime.now(timezone.utc)
    token_hash = hash_refresh_token(body.refresh_token)
    await refuse_before_its_turn(body.refresh_token, token_hash, now)  # 12
    # Spending it and storing the next one commit together: whoever sees it spent also
    # sees its successor, and ends that too on a reuse.
    async with held_within(refreshes_one_at_a_time, DATABASE_WAIT_SECONDS), database.transaction():
        # One statement checks and spends: of two refreshes at once, only one wins.
        spent = await database.fetch_one(
            refresh_tokens.update()
            .where(*spendable(token_hash, now))
            .values(spent_at=now)
            .returning(*refresh_tokens.c)
        )
        if spent is not None:
            token = await store_refresh_token(
                user_id=spent["user_id"],
                family=spent["family"],
                token_version=spent["token_version"],
                expires_at=now + timedelta(days=REFRESH_EXPIRES_DAYS),
                family_expires_at=spent["family_expires_at"],
            )
            await forget_spent_tokens(spent["family"])  # 12
    if spent is None:
        await refuse_a_forgotten_token(body.refresh_token, token_hash, now)  # 12
        await refuse_refresh(token_hash, now)
    # The version the family was made under, not a fresh read: a logout that lands
    # now revokes this access token too.
    user = {"id": spent["user_id"], "token_version": spent["token_version"]}
    return {"token": create_access_token(user), "refresh_token": token}


# --- 9 A password in an error message ---


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's own 422 repeats each wrong value: a rejected password must not come back.
    problems = [{key: value for key, value in e.items() if key != "input"} for e in error.errors()]
    return JSONResponse(
        {"detail": jsonable_encoder(problems)}, status.HTTP_422_UNPROCESSABLE_CONTENT
    )


# --- 10 Input that crashes the app ---

# A user id we issued: a positive whole number, small enough for the id column
# (PostgreSQL's INTEGER holds up to 2**31 - 1; a larger one would be a 500 there).
USER_ID_PATTERN = re.compile(r"[1-9][0-9]{0,9}")
MAX_USER_ID = 2**31 - 1


def is_user_id(sub: str) -> bool:
    return bool(USER_ID_PATTERN.fullmatch(sub)) and int(sub) <= MAX_USER_ID


# --- 11 Look-alikes ---


def email_address(text: str) -> str:
    # The API's rules (Email, in 0): lowercased and normalised, so it is found however typed.
    try:
        return TypeAdapter(Email).validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a valid email address: {text!r}")


# --- 12 A flood ---


# A hash takes a few tenths of a second on purpose, so it runs in worker threads at
# low priority, never on the event loop, and never more at once than there are cores.
def lower_priority() -> None:
    if hasattr(os, "nice"):
        os.nice(19)


def lowest_priority() -> None:
    lower_priority()
    try:  # Linux: a hash runs only when a core has nothing else to run
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # elsewhere, or where it is not allowed: nice 19 alone


CORES = os.cpu_count() or 1
# Strangers' hashes wait for an idle core. A returning user's, at nice 19, comes first on
# a core that strangers keep busy, even those of another worker (Linux).
hashing_pool = ThreadPoolExecutor(max_workers=CORES, initializer=lowest_priority)
returning_pool = ThreadPoolExecutor(max_workers=CORES, initializer=lower_priority)


def time_one_hash() -> float:
    start = time.perf_counter()
    pwd_context.hash("a password to time one hash")
    return time.perf_counter() - start


# No hash should wait more than about 2 seconds. Past that many in line, a request gets
# 503 instead of queueing behind a flood for minutes.
MAX_HASHES_IN_LINE = max(CORES, round(CORES * 2 / time_one_hash()))
BUSY_PAUSE_SECONDS = 2  # as long as the Retry-After of the 503 it delays
hashing_threads = asyncio.Semaphore(max(1, CORES // 2))  # the strangers' threads
hashes_in_line = 0
# Users returning to an address they logged in from (known_logins, 7) go ahead of
# strangers, one login each at a time. Strangers get half the line and at most half the
# threads (the one of a single core): where no hash waits for an idle core (not Linux),
# the other cores are left to returning users.
going_ahead: set[tuple[str, str]] = set()


def goes_ahead(request: Request) -> bool:
    known_login = getattr(request.state, "known_login", None)  # set by claim_attempt
    return known_login is not None and known_login not in going_ahead


def no_place_in_line(request: Request) -> bool:
    if goes_ahead(request):
        return hashes_in_line >= MAX_HASHES_IN_LINE
    return hashes_in_line >= max(1, MAX_HASHES_IN_LINE // 2)


async def turned_away(request: Request) -> HTTPException:
    if not goes_ahead(request):
        # A stranger's 503 comes after a pause, so that a flood cannot come straight back.
        await asyncio.sleep(BUSY_PAUSE_SECONDS)
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Too many passwords to check at once: try again in a moment.",
        headers={"Retry-After": "2"},
    )


def client_gone() -> HTTPException:
    return HTTPException(499, "The client hung up.")  # nginx's code for it; nobody reads it


async def take_back_claim(request: Request) -> None:
    # A burst may fill the line after claim_attempt checked it: a request turned away
    # here has not failed, so its claim goes. Not by id alone: SQLite gives the id of a
    # row forget_failures deleted to the next claim, maybe another's.
    claim = getattr(request.state, "claim", None)
    if claim is not None:
        id_, failed_at = claim
        mine = (failed_logins.c.id == id_) & (failed_logins.c.failed_at == failed_at)
        await database.execute(failed_logins.delete().where(mine))


# A sign-up that works is no failure, but it still counts against its address: at most 100
# an hour from one address (7), so nobody makes accounts without end. No email looks like this.
SIGN_UP = "(a sign-up)"


async def count_sign_up(address: str) -> None:
    sign_up = {"email": SIGN_UP, "address": address, "failed_at": time.time()}
    await database.execute(failed_logins.insert().values(**sign_up))


async def run_hashing(request: Request, function, *args):
    global hashes_in_line
    if no_place_in_line(request):
        await take_back_claim(request)
        raise await turned_away(request)
    # Checked and counted with no await between: a burst cannot pass the check together.
    ahead = goes_ahead(request)
    hashes_in_line += 1
    if ahead:
        going_ahead.add(request.state.known_login)
    try:
        # Strangers wait here, on the event loop, for one of their threads. A returning
        # user goes straight to a pool of their own.
        async with nullcontext() if ahead else hashing_threads:
            # Checked just before the hash: a client that has hung up costs no hash.
            if await request.is_disconnected():
                raise client_gone()
            loop = asyncio.get_running_loop()
            pool = returning_pool if ahead else hashing_pool
            return await loop.run_in_executor(pool, function, *args)
    finally:
        hashes_in_line -= 1
        if ahead:
            going_ahead.discard(request.state.known_login)


# A refresh costs no hash: a client could refresh hundreds of times a second, a new row each
# time. A family may refresh MAX_REFRESHES times in REFRESH_WINDOW, and keeps one spent
# token more: enough to count its refreshes, and to catch a recent one coming back.
MAX_REFRESHES = 10  # one every 15 minutes is all a client needs
REFRESH_WINDOW = timedelta(minutes=10)
# SQLite lets one writer in at a time, but not in the order they came: in a flood of
# refreshes, one waited past its 5 seconds. So in this worker they take turns, before taking
# a connection, not holding one. (On PostgreSQL, which locks rows, that costs a little speed.)
refreshes_one_at_a_time = asyncio.Lock()


async def check_refresh_rate(family: str, now: datetime) -> None:
    # The family's spent tokens, latest first (this one is not spent yet): with the one
    # MAX_REFRESHES - 1 back inside the window, this refresh would be one too many.
    oldest = await database.fetch_val(
        sqlalchemy.select(refresh_tokens.c.spent_at)
        .where(refresh_tokens.c.family == family, refresh_tokens.c.spent_at.is_not(None))
        .order_by(refresh_tokens.c.spent_at.desc())
        .offset(MAX_REFRESHES - 1)
        .limit(1)
    )
    if oldest is None:
        return
    if oldest.tzinfo is None:  # SQLite gives back UTC without saying so
        oldest = oldest.replace(tzinfo=timezone.utc)
    wait = math.ceil((oldest + REFRESH_WINDOW - now).total_seconds())
    if wait > 0:
        # Raised before the token is spent: it stays unspent, to be used later.
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"Too many refreshes: try again in {wait} s.",
            headers={"Retry-After": str(wait)},
        )


async def delete_tokens_not_held(*where) -> None:
    # PostgreSQL: a row that another request holds is skipped, not waited for, as waiting
    # could deadlock with it (SQLite locks the whole file and ignores this).
    rows = sqlalchemy.select(refresh_tokens.c.id).where(*where)
    not_held = rows.with_for_update(skip_locked=True)
    await database.execute(refresh_tokens.delete().where(refresh_tokens.c.id.in_(not_held)))


async def forget_spent_tokens(family: str) -> None:
    # Older spent tokens go, so a family keeps a few rows, not one per refresh. One of
    # them coming back still names its family: refuse_a_forgotten_token ends it.
    latest = (
        sqlalchemy.select(refresh_tokens.c.id)
        .where(refresh_tokens.c.family == family, refresh_tokens.c.spent_at.is_not(None))
        .order_by(refresh_tokens.c.id.desc())
        .limit(MAX_REFRESHES + 1)
    )
    # A row that a reuse ending this family holds stays: the next refresh removes it.
    await delete_tokens_not_held(
        refresh_tokens.c.family == family,
        refresh_tokens.c.spent_at.is_not(None),
        refresh_tokens.c.family_ended_at.is_(None),
        refresh_tokens.c.id.not_in(latest),
    )


# Each login starts a family that lasts 30 days: a loop of logins to one account would add
# them without end. A user keeps the MAX_SESSIONS used last; older ones go (their tokens: 401).
MAX_SESSIONS = 20  # more devices than anyone logs in from


async def forget_oldest_sessions(user_id: int) -> None:
    latest = (
        sqlalchemy.select(refresh_tokens.c.family)
        .where(refresh_tokens.c.user_id == user_id)
        .group_by(refresh_tokens.c.family)
        .order_by(sqlalchemy.func.max(refresh_tokens.c.id).desc())
        .limit(MAX_SESSIONS)
    )
    # A family whose row a refresh holds is in use: that row stays.
    await delete_tokens_not_held(
        refresh_tokens.c.user_id == user_id, refresh_tokens.c.family.not_in(latest)
    )


async def refuse_a_forgotten_token(token: str, token_hash: str, now: datetime) -> None:
    # No row for this token, but its family has rows: it is a spent token that
    # forget_spent_tokens removed, coming back. As in refuse_refresh: end the family.
    family = token.partition(".")[0]
    rows_of = sqlalchemy.select(sqlalchemy.func.count()).select_from(refresh_tokens)
    if await database.fetch_val(rows_of.where(refresh_tokens.c.token_hash == token_hash)):
        return  # its row is there: refuse_refresh says why
    live = rows_of.where(
        refresh_tokens.c.family == family, refresh_tokens.c.family_ended_at.is_(None)
    )
    if not await database.fetch_val(live):
        return  # no such family, or ended already: refuse_refresh says it is invalid
    await database.execute(
        refresh_tokens.update().where(refresh_tokens.c.family == family).values(family_ended_at=now)
    )
    logging.getLogger(__name__).warning(f"A forgotten refresh token came back: {family} is ended.")
    raise unauthorized("Refresh token already used: log in again.")


async def refuse_before_its_turn(token: str, token_hash: str, now: datetime) -> None:
    # Before its turn: a flood of made-up, spent, revoked or too frequent tokens makes no one
    # wait. A family has one unspent token at a time, so no refresh of it can race this count.
    usable = await database.fetch_one(refresh_tokens.select().where(*spendable(token_hash, now)))
    if usable is None:
        await refuse_a_forgotten_token(token, token_hash, now)
        await refuse_refresh(token_hash, now)
    await check_refresh_rate(usable["family"], now)


MAX_BODY_BYTES = 64 * 1024  # the forms of this app are a few hundred bytes


class LimitBodySize:
    """ASGI middleware: refuse a body over MAX_BODY_BYTES with 413, before it is read whole."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if int(declared) > MAX_BODY_BYTES:
            response = JSONResponse(
                {"detail": "Request body too large."}, status.HTTP_413_CONTENT_TOO_LARGE
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counting_receive():
            # Without Content-Length (chunked), count the body as it arrives.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "Request body too large.")
            return message

        await self.app(scope, counting_receive, send)


app.add_middleware(LimitBodySize)


# --- 13 A new server, an old database ---


def is_email_taken(error: Exception) -> bool:
    """Did the insert fail because the email is taken? Each driver reports it its own way."""
    if isinstance(error, sqlite3.IntegrityError):
        # SQLite raises IntegrityError for every broken rule, NOT NULL included.
        return error.sqlite_errorname == "SQLITE_CONSTRAINT_UNIQUE"
    # PostgreSQL: asyncpg for the app's queries, psycopg for the admin command.
    return isinstance(error, (asyncpg.UniqueViolationError, psycopg.errors.UniqueViolation))


def check_columns() -> None:
    # create_all adds missing tables, never missing columns: stop now, not with a 500 later.
    inspector = sqlalchemy.inspect(engine)
    for table in metadata.sorted_tables:
        found = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in found:
                refuse_to_start(
                    f"The {table.name} table in the database has no {column.name} column. "
                    "Add it with a migration (lesson.md, Appendix B), or, if the data "
                    "does not matter, delete the database and start again."
                )


def use_wal_mode() -> None:
    # WAL: readers never wait for the writer, and writers wait less. It stays
    # set in the file. The switch needs the file to itself: if another worker is busy with
    # it right now, that worker, or the next start, makes the switch.
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    except sqlalchemy.exc.OperationalError:
        pass


def create_tables() -> None:
    try:
        # create_all looks, then creates: workers that start together could all see no
        # table and all create it. A lock, held until the commit, lets them in one at a time.
        with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite locks the whole file
            elif engine.dialect.name == "postgresql":
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(1)")  # any number
            metadata.create_all(connection)
        if engine.dialect.name == "sqlite":
            use_wal_mode()
    except sqlalchemy.exc.OperationalError as error:
        refuse_to_start(
            f"Cannot open the database: {error.orig}\n"
            "Check DATABASE_URL, and that the database server is running."
        )


class StartupChecks:
    """Create and check the tables before the app starts; refuse clearly if they are wrong.

    An ASGI middleware, not part of the lifespan: Starlette reports whatever the lifespan
    raises with a traceback. The ASGI way to refuse is "lifespan.startup.failed".
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            try:
                create_tables()
                check_columns()
            except BaseException as error:
                await receive()  # the server's "lifespan.startup"
                # A refusal has printed its message; anything else is a crash: show it all.
                message = "" if isinstance(error, SystemExit) else traceback.format_exc()
                await send({"type": "lifespan.startup.failed", "message": message})
                raise
        await self.app(scope, receive, send)


app.add_middleware(StartupChecks)


def read_password() -> str:
    # Typed at a prompt it stays out of the shell history; piped in, it suits scripts.
    if sys.stdin.isatty():
        return getpass.getpass("Password: ")
    return sys.stdin.readline().rstrip("\n")


def create_user_command(connection, args) -> str:
    try:
        user = UserSignIn(
            email=args.email,
            password=read_password(),
            full_name=args.full_name,
            phone=args.phone,
        )
    except ValidationError as error:
        # The messages without the input: a rejected password stays off the screen.
        problems = [f"{e['loc'][0]}: {e['msg']}" for e in error.errors()]
        raise SystemExit("Not created: " + "; ".join(problems))
    if is_easy_to_guess(user.password):
        raise SystemExit("Not created: password: too common or too easy to guess")
    values = user.model_dump()
    values["password"] = pwd_context.hash(user.password)
    values["role"] = UserRolesEnum[args.role]
    try:
        connection.execute(users.insert().values(**values))
    except sqlalchemy.exc.IntegrityError as error:
        # SQLAlchemy wraps the driver's error: the same check as at /register.
        if not is_email_taken(error.orig):
            raise
        raise SystemExit(f"Not created: {user.email} is taken. Use set-role instead.")
    return f"Created {user.email} with role {args.role}."


# --- 15 The database stops answering ---


SQLITE_AWAY = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_READONLY",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
)


def is_database_away(error: Exception) -> bool:
    """Did the database fail to answer (away, locked, full, read-only), not the code?"""
    if isinstance(error, sqlite3.OperationalError):
        # "no such column" is an OperationalError too, but a bug: only these are the database's.
        return getattr(error, "sqlite_errorname", "").startswith(SQLITE_AWAY)
    return isinstance(
        error,
        (
            OSError,  # cannot connect, connection reset; a TimeoutError is an OSError too
            asyncpg.PostgresConnectionError,  # the connection broke
            asyncpg.InternalClientError,  # a connection ended between two queries (asyncpg#1069)
            asyncpg.OperatorInterventionError,  # shutting down, starting up, statement_timeout
            asyncpg.InsufficientResourcesError,  # disk full, too many connections
            asyncpg.ObjectNotInPrerequisiteStateError,  # connections not allowed
            asyncpg.ReadOnlySQLTransactionError,  # a standby, or a read-only database
            asyncpg.DeadlockDetectedError,  # two requests waited for each other: one retries
        ),
    )


# Writes that must not be lost while the database is away: each tried again until it answers.
waiting_writes: set[asyncio.Task] = set()  # asyncio keeps only a weak reference to a task


def write_when_back(statement) -> None:
    task = asyncio.create_task(write_again(statement))
    waiting_writes.add(task)
    task.add_done_callback(waiting_writes.discard)


async def write_again(statement) -> None:
    # Every second, for an hour at most: by then a failed login no longer counts anyway.
    give_up = time.monotonic() + 3600
    while time.monotonic() < give_up:
        await asyncio.sleep(1)
        try:
            await database.execute(statement)
            return
        except Exception as error:
            if not is_database_away(error):
                raise


# The routes answering 503 now: one log line as each starts, one as it answers again.
failing_routes: set[str] = set()
database_log = logging.getLogger(__name__)


class DatabaseAway:
    """ASGI middleware: while the database cannot answer, 503 with Retry-After, not a 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] < 400:
                    back_again(scope)
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as error:
            # A lost connection can fail the ROLLBACK too: its error hides the first one.
            first = error.__context__ or error
            if started or not (is_database_away(error) or is_database_away(first)):
                raise  # a bug: the server logs it with its traceback
            route = route_of(scope)
            if route not in failing_routes:
                failing_routes.add(route)
                cause = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0][:200]
                database_log.warning(f"{route}: the database is not answering ({cause}).")
            response = JSONResponse(
                {"detail": "The database is not answering: try again in a few seconds."},
                status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": str(DATABASE_WAIT_SECONDS)},
            )
            await response(scope, receive, send)


@asynccontextmanager
async def held_within(lock: asyncio.Lock, seconds: float):
    """Hold `lock`, waiting for it at most `seconds`: then TimeoutError, which is a 503."""
    # A request waiting here may hold a database connection that the lock's holder needs:
    # waiting for ever, neither would move again.
    try:
        await asyncio.wait_for(lock.acquire(), seconds)
    except TimeoutError:
        raise TimeoutError(f"waited {seconds} s for its turn") from None
    try:
        yield
    finally:
        lock.release()


def route_of(scope) -> str:
    # The route's own path, never the one a client sent: a few names, not one per URL.
    route = scope.get("route")
    return f"{scope['method']} {route.path if route else '(no route)'}"


def back_again(scope) -> None:
    route = route_of(scope)
    if route in failing_routes:
        failing_routes.discard(route)
        database_log.warning(f"{route}: the database answers again.")


app.add_middleware(DatabaseAway)


# --- 5 Run the admin command ---

if __name__ == "__main__":
    main()
