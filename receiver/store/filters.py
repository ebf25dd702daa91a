"""The one filter of the evaluation list and the overview, and the WHERE clause it becomes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .search import CANDIDATES, SEARCHED


def like_pattern(text: str) -> str:
    """`%text%` for LIKE … ESCAPE '\\': the text is matched literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(frozen=True)
class EvaluationFilter:
    """Every filter of GET /api/evaluations; None means "any"."""

    client_ref: str | None = None
    status: str | None = None
    passed: bool | None = None
    task_type: str | None = None
    failure_code: str | None = None
    since: str | None = None  # stored time form, compared with received_at
    until: str | None = None
    q: str | None = None
    changed_since: str | None = None  # stored time form, compared with updated_at

    def where(
        self,
        alias: str = "",
        *,
        candidates: Sequence[int] | None = None,
        lead: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """` WHERE …` (or "") and its parameters; `alias` qualifies columns in joins.

        `candidates`: rowids the text index found for `q` (LIKE still decides). `lead`: what
        should drive the query (an equality filter, "rowid" for the candidates, "received_at",
        "updated_at"); the others get a unary `+`, which keeps the planner from choosing their
        indexes.
        """
        a = f"{alias}." if alias else ""
        clauses = []
        params: dict[str, Any] = {}
        for name in ("client_ref", "status", "task_type", "failure_code", "passed"):
            value = getattr(self, name)
            if value is not None:
                plus = "+" if lead is not None and name != lead else ""
                clauses.append(f"{plus}{a}{name} = :{name}")
                params[name] = int(value) if name == "passed" else value
        received = "+" if lead == "updated_at" else ""
        if self.since is not None:
            clauses.append(f"{received}{a}received_at >= :since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append(f"{received}{a}received_at < :until")
            params["until"] = self.until
        if self.changed_since is not None:
            clauses.append(f"{a}updated_at >= :changed_since")
            params["changed_since"] = self.changed_since
        if self.q:
            params["q"] = like_pattern(self.q)
            clauses.append(
                "(" + " OR ".join(f"{a}{column} LIKE :q ESCAPE '\\'" for column in SEARCHED) + ")"
            )
            if candidates is not None:
                clauses.append(("+" if lead not in (None, "rowid") else "") + a + CANDIDATES)
                params["candidates"] = json.dumps(list(candidates))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params
