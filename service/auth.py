"""Teams and API tokens: a token is shown once and stored only as its SHA-256."""

from __future__ import annotations

import hashlib
import secrets

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


def team_for_token(*, session: Session, token: str) -> Team | None:
    return session.scalars(
        select(Team)
        .join(ApiToken, ApiToken.team_id == Team.id)
        .where(ApiToken.token_hash == hash_token(token))
    ).first()
