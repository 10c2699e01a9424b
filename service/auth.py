"""Teams and API tokens: a token is shown once and stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiToken, Team

TOKEN_PREFIX = "tq_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, session: Session, team_name: str) -> tuple[Team, str]:
    """A new token for ``team_name``, creating the team when new."""
    team = session.scalars(select(Team).where(Team.name == team_name)).first()
    if team is None:
        team = Team(name=team_name)
        session.add(team)
        session.flush()
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(team_id=team.id, token_hash=hash_token(token)))
    session.commit()
    return team, token


def list_tokens(*, session: Session, team_name: str | None = None) -> list[tuple[ApiToken, str]]:
    """Every token (or a team's), oldest first, with its team's name; never the token."""
    query = select(ApiToken, Team.name).join(Team, Team.id == ApiToken.team_id)
    if team_name is not None:
        query = query.where(Team.name == team_name)
    return [(token, name) for token, name in session.execute(query.order_by(ApiToken.id))]


def revoke_token(*, session: Session, token_id: int) -> str | None:
    """Delete a token; the name of its team, or None when there is no such token. An
    API process that verified it in the last ``TOKEN_CACHE_S`` seconds may still take
    it until then."""
    row = session.execute(
        select(ApiToken, Team.name)
        .join(Team, Team.id == ApiToken.team_id)
        .where(ApiToken.id == token_id)
    ).first()
    if row is None:
        return None
    session.delete(row[0])
    session.commit()
    return str(row[1])


#: How long a verified token is trusted without asking the database again.
TOKEN_CACHE_S = 30.0
_TOKEN_CACHE_MAX = 10_000
_verified: dict[str, tuple[int, str, float]] = {}


def cached_team(token: str) -> Team | None:
    """The team of a token verified in the last ``TOKEN_CACHE_S`` seconds, without a
    query (detached, with its id and name); None when the database must be asked."""
    cached = _verified.get(hash_token(token))
    if cached is not None and cached[2] > time.monotonic():
        return Team(id=cached[0], name=cached[1])
    return None


def team_for_token(*, session: Session, token: str) -> Team | None:
    """The token's team, from the cache of verified tokens or from the database."""
    team = cached_team(token)
    if team is not None:
        return team
    digest = hash_token(token)
    team = session.scalars(
        select(Team)
        .join(ApiToken, ApiToken.team_id == Team.id)
        .where(ApiToken.token_hash == digest)
    ).first()
    if team is not None:
        if len(_verified) >= _TOKEN_CACHE_MAX:
            _verified.clear()
        _verified[digest] = (team.id, team.name, time.monotonic() + TOKEN_CACHE_S)
    return team
