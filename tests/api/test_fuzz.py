"""schemathesis over the live API's own OpenAPI schema, read at run time so every route is covered.

Team A fuzzes every operation; team B owns a file and a job. Path parameters and id fields of
request bodies are sometimes swapped for team B's ids. Checks: no 5xx, responses match the schema,
and team B's objects stay invisible to team A (404, never 2xx, never a different refusal that would
reveal they exist). Bounded: a fixed number of examples per operation, derandomized, so the run is
the same every time; about three minutes on two cores. Deselect with -m "not fuzz".
"""

from __future__ import annotations

import httpx
import hypothesis.strategies as st
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.factories import create_job, create_team, uploaded_file_id

EXAMPLES_PER_OPERATION = 20
# What team A may get for a request naming team B's object: 404, like a missing one, or 429
# from the rate limit. A request that breaks the schema may also be refused before any lookup.
_HIDDEN = {404, 429}
_REFUSED_UNREAD = {400, 413}

pytestmark = pytest.mark.fuzz


@pytest.fixture(scope="module")
def teams(server, services_env, tiny_model) -> dict:
    """Team A's key, and team B's objects by kind."""
    _, key_a = create_team()
    _, key_b = create_team()
    with httpx.Client(base_url=f"{server}/v1", headers={"Authorization": f"Bearer {key_b}"}, timeout=60) as b:
        file_id = uploaded_file_id(b)
        job_id = create_job(b, file_id, hyperparameters={"n_epochs": 1})["id"]
    return {"key_a": key_a, "foreign": {"file": file_id, "job": job_id}}


def _foreign_for(name: str, foreign: dict) -> list[str]:
    """Team B's ids that fit a parameter or field name (every id when the name says nothing)."""
    if "file" in name:
        return [foreign["file"]]
    if "job" in name:
        return [foreign["job"]]
    return list(foreign.values())


def _schema(server: str, foreign: dict):
    """The running service's schema, with hooks that sometimes put team B's ids where ids go."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")

    @schema.hook
    def flatmap_path_parameters(_ctx, path_parameters: dict):
        if not path_parameters:
            return st.just(path_parameters)
        swapped = {name: st.sampled_from(_foreign_for(name, foreign)) for name in path_parameters}
        return st.one_of(st.just(path_parameters), st.fixed_dictionaries(swapped))

    @schema.hook
    def flatmap_body(_ctx, body):
        fields = [k for k in body if k.endswith(("_file", "_id"))] if isinstance(body, dict) else []
        if not fields:
            return st.just(body)
        swapped = st.fixed_dictionaries({k: st.sampled_from(_foreign_for(k, foreign)) for k in fields})
        return st.one_of(st.just(body), swapped.map(lambda s: {**body, **s}))

    return schema


def _foreign_ids_in(case, foreign_ids: set[str]) -> list[str]:
    values = list((case.path_parameters or {}).values())
    if isinstance(case.body, dict):
        values += list(case.body.values())
    return [v for v in values if isinstance(v, str) and v in foreign_ids]


def _hides(foreign_ids: set[str], mode: GenerationMode, probed: set[str]):
    """The cross-team check; records in `probed` each operation it saw asked for team B's object."""
    allowed = _HIDDEN | (_REFUSED_UNREAD if mode is GenerationMode.NEGATIVE else set())

    def another_teams_objects_are_hidden(_ctx, response, case):
        used = _foreign_ids_in(case, foreign_ids)
        in_path = used and set(used) & set((case.path_parameters or {}).values())
        if in_path:
            probed.add(case.operation.label)
        if in_path and response.status_code not in allowed:
            raise AssertionError(f"team A got {response.status_code} for team B's {used}: {response.text[:300]}")
        if used and 200 <= response.status_code < 300:
            raise AssertionError(f"team A used team B's {used} and got {response.status_code}: {response.text[:300]}")
        try:
            body = response.json()
        except ValueError:
            return
        listed = [x.get("id") for x in body.get("data", []) if isinstance(x, dict)] if isinstance(body, dict) else []
        leaked = foreign_ids.intersection(listed)
        if leaked:
            raise AssertionError(f"team B's objects {sorted(leaked)} listed for team A")

    return another_teams_objects_are_hidden


def _fuzz(operation, mode: GenerationMode, check, *, server: str, headers: dict) -> None:
    """Run one operation's examples in one generation mode, with `check` besides schemathesis' own."""

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def run(case):
        # Schema-valid is not enough to be accepted here (a file must be valid JSONL, a model
        # registered), so positive_data_acceptance does not apply; every other check does.
        case.call_and_validate(base_url=server, headers=headers, additional_checks=[check],
                               excluded_checks=[positive_data_acceptance])

    run()


def test_api_conforms_and_never_crosses_teams(server, teams):
    schema = _schema(server, teams["foreign"])
    headers = {"Authorization": f"Bearer {teams['key_a']}"}
    failures: list[str] = []
    probed: set[str] = set()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]  # the schema was read, not empty
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            check = _hides(set(teams["foreign"].values()), mode, probed)
            try:
                _fuzz(operation, mode, check, server=server, headers=headers)
            except Unsatisfiable:  # nothing in this operation can be made invalid (negative mode)
                continue
            except (Exception, BaseExceptionGroup) as exc:  # report every operation's failures at the end
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    with_ids = {op.label for op in operations if "{" in op.path}
    assert with_ids and with_ids <= probed, f"never asked for team B's objects: {sorted(with_ids - probed)}"
