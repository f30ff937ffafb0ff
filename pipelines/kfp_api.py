"""Submit and schedule the pipeline on Kubeflow Pipelines through `kfp.Client`.

Everything is checked before anything is created: the host answers (and is KFP), the token is
accepted, the namespace is ours to use, the parameters are known and typed, the cron is valid.
Then the compiled package is uploaded as a new version of the pipeline, and a run (or a
recurring run on that pinned version) is started.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fineserve.core.errors import ClusterError, ParameterError

TOKEN_ENV = "KF_PIPELINES_TOKEN"
API = "/apis/v2beta1"

#: robfig/cron v1 (the KFP backend's parser): six fields, seconds first.
CRON_FIELDS = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
#: KFP's ScheduledWorkflow controller (backend/src/crd/controller/scheduledworkflow/util/
#: cron_schedule.go) schedules with robfig/cron v1.2.0, whose `Next` (spec.go) returns the zero
#: time, i.e. never, for a schedule that matches no time within five years.
FIRE_HORIZON_YEARS = 5
_NAMES = {
    "month": {m: i for i, m in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)},
    "day of week": {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}  # fmt: skip


def read_token(token_file: str = "") -> str:
    """The bearer token: from ``token_file``, else $KF_PIPELINES_TOKEN; "" for none."""
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as err:
            raise ParameterError(f"cannot read the token file {token_file!r}: {err}") from None
    return os.environ.get(TOKEN_ENV, "").strip()


@dataclass
class Connection:
    """A checked connection to one KFP API, as one namespace's user."""

    host: str
    namespace: str
    token: str
    client: Any  # kfp.Client

    @property
    def ui(self) -> str:
        """The UI's base URL (the API host, as KFP's own client assumes)."""
        return self.host.rstrip("/")


def connect(host: str, namespace: str, token: str, timeout: float = 10.0) -> Connection:
    """A `kfp.Client` for ``host`` once the host, the token and the namespace are checked."""
    import httpx

    if not host:
        raise ParameterError("no KFP host: give --host or kubeflow.host in the params file")
    if not host.startswith(("http://", "https://")):
        raise ParameterError(f"the KFP host must be an http(s) URL, got {host!r}")
    host = host.rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    how = "set $KF_PIPELINES_TOKEN or --token-file" if not token else "get a fresh token"

    def get(path: str, **params: Any) -> httpx.Response:
        try:
            return httpx.get(f"{host}{path}", params=params, headers=headers, timeout=timeout)
        except httpx.HTTPError as err:
            raise ClusterError(f"cannot reach Kubeflow Pipelines at {host}: {err}") from None

    health = get(f"{API}/healthz")
    if health.status_code == 401:
        raise ClusterError(f"KFP at {host} refused the token (HTTP 401): missing or expired; {how}")
    if health.status_code == 404 or "json" not in health.headers.get("content-type", ""):
        raise ClusterError(
            f"no KFP API at {host} ({API}/healthz answered HTTP {health.status_code}): is "
            "the URL the pipelines endpoint (e.g. https://HOST/pipeline)?"
        )
    if health.status_code != 200:
        raise ClusterError(f"KFP at {host}: healthz answered HTTP {health.status_code}")
    if namespace:
        probe = get(f"{API}/experiments", namespace=namespace, page_size=1)
        if probe.status_code in (401, 403, 404):
            raise ClusterError(
                f"namespace {namespace!r} on KFP at {host}: HTTP {probe.status_code} "
                f"({_message(probe)}); is it your Kubeflow profile's namespace, and the "
                "token one with access to it?"
            )
        if probe.status_code != 200:
            raise ClusterError(f"KFP at {host}: listing experiments answered {_message(probe)}")
    import kfp

    client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token or None)
    return Connection(host, namespace, token, client)


def _message(response) -> str:
    try:
        body = response.json()
        return str(body.get("message") or body.get("error") or body)[:300]
    except ValueError:
        return response.text[:300]


# ------------------------------------------------------------------------------ cron


def to_six_fields(expression: str) -> str:
    """``expression`` as the six-field cron KFP's backend reads (seconds first).

    Five fields (Unix cron) get a leading `0` second; six pass unchanged. Each field is checked
    against its range; a ParameterError names the field and the range allowed.
    """
    parts = expression.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise ParameterError(
            f"cron {expression!r} has {len(expression.split())} fields: give five (minute hour "
            "day-of-month month day-of-week, as in Unix cron) or six (with seconds first)"
        )
    for part, (name, low, high) in zip(parts, CRON_FIELDS, strict=True):
        _check_cron_field(part, name, low, high)
    six_fields = " ".join(parts)
    if not next_runs(six_fields, 1):
        raise ParameterError(
            f"cron {expression!r} never fires: no time matches it within {FIRE_HORIZON_YEARS} "
            "years, after which KFP's scheduler gives up; check that its days of the month "
            "exist in its months (30 February never comes)"
        )
    return six_fields


def _check_cron_field(text: str, name: str, low: int, high: int) -> None:
    names = _NAMES.get(name, {})

    def value(token: str) -> int:
        if token.lower() in names:
            number = names[token.lower()]
        elif token.isdigit():
            number = int(token)
        else:
            known = f" or one of {', '.join(names)}" if names else ""
            raise ParameterError(
                f"cron field {name!r}: {token!r} is not a number{known} (allowed {low}-{high})"
            )
        if not low <= number <= high:
            raise ParameterError(f"cron field {name!r}: {number} is outside {low}-{high}")
        return number

    for item in text.split(","):
        body, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) < 1):
            raise ParameterError(f"cron field {name!r}: step {step!r} must be a positive number")
        if body in ("*", "?"):
            if body == "?" and name not in ("day of month", "day of week"):
                raise ParameterError(f"cron field {name!r}: '?' is only for the day fields")
            continue
        first, dash, last = body.partition("-")
        start = value(first)
        if dash and value(last) < start:
            raise ParameterError(f"cron field {name!r}: range {body!r} runs backwards")


def next_runs(six_field: str, count: int = 3, now: datetime | None = None) -> list[datetime]:
    """When the next ``count`` runs of ``six_field`` start (UTC, as the backend schedules).

    Fewer (none) when the cron matches no time within `FIRE_HORIZON_YEARS` of the last one.
    """
    from croniter import CroniterBadDateError, croniter

    second, *rest = six_field.split()
    # croniter's six-field form puts the seconds last
    start = now or datetime.now(timezone.utc)
    cron = croniter(
        " ".join([*rest, second]).replace("?", "*"),
        start,
        max_years_between_matches=FIRE_HORIZON_YEARS,
    )
    runs: list[datetime] = []
    try:
        while len(runs) < count:
            runs.append(cron.get_next(datetime))
    except CroniterBadDateError:
        pass
    return runs


def parse_interval(text: str) -> int:
    """Seconds of an interval such as 3600, 90m, 6h or 1d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not number.isdigit() or int(number) <= 0:
        raise ParameterError(
            f"--every must be a positive duration (seconds, or e.g. 90m, 6h, 1d), got {text!r}"
        )
    return int(number) * units[unit]


# ------------------------------------------------------------------------------ uploads


@dataclass
class PinnedVersion:
    """The pipeline and the version just uploaded."""

    pipeline_id: str
    version_id: str
    version_name: str


def upload_version(
    connection: Connection, package: str | Path, pipeline_name: str, version_name: str = ""
) -> PinnedVersion:
    """Upload ``package`` as a new version of ``pipeline_name``.

    A pipeline that does not exist yet is created by the upload, with the package as its first
    version (KFP names that one after the pipeline).
    """
    client = connection.client
    version_name = version_name or f"{pipeline_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    pipeline_id = _call("look the pipeline up", client.get_pipeline_id, name=pipeline_name)
    if pipeline_id is None:  # the upload creates the pipeline with its first version
        pipeline = _call(
            "upload the pipeline",
            client.upload_pipeline,
            pipeline_package_path=str(package),
            pipeline_name=pipeline_name,
            namespace=connection.namespace or None,
        )
        listed = _call(
            "read the pipeline's first version",
            client.list_pipeline_versions,
            pipeline_id=pipeline.pipeline_id,
        )
        (version,) = listed.pipeline_versions
        return PinnedVersion(
            pipeline.pipeline_id, version.pipeline_version_id, version.display_name
        )
    version = _call(
        "upload the pipeline version",
        client.upload_pipeline_version,
        pipeline_package_path=str(package),
        pipeline_version_name=version_name,
        pipeline_id=pipeline_id,
    )
    return PinnedVersion(pipeline_id, version.pipeline_version_id, version_name)


def experiment_id(connection: Connection, name: str) -> str:
    """The id of experiment ``name`` in the connection's namespace, created when missing."""
    experiment = connection.client.create_experiment(name, namespace=connection.namespace or None)
    return experiment.experiment_id


def run_url(connection: Connection, run_id: str) -> str:
    """Where the UI shows a run."""
    return f"{connection.ui}/#/runs/details/{run_id}"


# ------------------------------------------------------------------------------ runs


@dataclass
class Submission:
    """What a submit or schedule created, for the user to find it."""

    pinned: PinnedVersion
    experiment_id: str
    id: str  # the run's or the recurring run's
    url: str


def submit(
    connection: Connection,
    package: str | Path,
    *,
    pipeline_name: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    service_account: str = "",
    version_name: str = "",
) -> Submission:
    """Upload ``package`` as a new pipeline version and start a run of it."""
    pinned = upload_version(connection, package, pipeline_name, version_name)
    experiment_id_ = experiment_id(connection, experiment)
    run = _call(
        "start the run",
        connection.client.run_pipeline,
        experiment_id=experiment_id_,
        job_name=run_name,
        params=params,
        pipeline_id=pinned.pipeline_id,
        version_id=pinned.version_id,
        service_account=service_account or None,
    )
    return Submission(pinned, experiment_id_, run.run_id, run_url(connection, run.run_id))


def schedule(
    connection: Connection,
    package: str | Path,
    *,
    pipeline_name: str,
    experiment: str,
    name: str,
    params: dict[str, Any],
    cron: str = "",
    interval_seconds: int = 0,
    catchup: bool = False,
    service_account: str = "",
    version_name: str = "",
) -> Submission:
    """A recurring run of a newly uploaded, pinned version: one at a time, no catch-up."""
    if bool(cron) == bool(interval_seconds):
        raise ParameterError("give exactly one of --cron and --every")
    pinned = upload_version(connection, package, pipeline_name, version_name)
    experiment_id_ = experiment_id(connection, experiment)
    recurring = _call(
        "create the recurring run",
        connection.client.create_recurring_run,
        experiment_id=experiment_id_,
        job_name=name,
        cron_expression=cron or None,
        interval_second=interval_seconds or None,
        max_concurrency=1,
        no_catchup=not catchup,
        params=params,
        pipeline_id=pinned.pipeline_id,
        version_id=pinned.version_id,
        enabled=True,
        service_account=service_account or None,
    )
    url = f"{connection.ui}/#/recurringrun/details/{recurring.recurring_run_id}"
    return Submission(pinned, experiment_id_, recurring.recurring_run_id, url)


def _call(what: str, method, **arguments: Any) -> Any:
    """``method(**arguments)``; an API refusal as a ClusterError saying what failed."""
    import kfp_server_api

    try:
        return method(**arguments)
    except kfp_server_api.ApiException as err:
        raise ClusterError(f"KFP could not {what}: HTTP {err.status}: {_api_reason(err)}") from None


def _api_reason(err) -> str:
    import json

    try:
        body = json.loads(err.body or "{}")
        return str(body.get("message") or body.get("error") or err.reason)[:300]
    except ValueError:
        return str(err.reason)


def recurring_runs(connection: Connection) -> list[Any]:
    """The recurring runs in the connection's namespace (first 100)."""
    listed = _call(
        "list the recurring runs",
        connection.client.list_recurring_runs,
        namespace=connection.namespace or None,
        page_size=100,
    )
    return listed.recurring_runs or []


def set_recurring_run(connection: Connection, recurring_run_id: str, action: str) -> None:
    """Enable, disable or delete one recurring run."""
    method = {
        "enable": connection.client.enable_recurring_run,
        "disable": connection.client.disable_recurring_run,
        "delete": connection.client.delete_recurring_run,
    }[action]
    _call(
        f"{action} the recurring run {recurring_run_id!r}",
        method,
        recurring_run_id=recurring_run_id,
    )


def describe_trigger(recurring) -> tuple[str, list[datetime]]:
    """A recurring run's trigger in words, and its next start times when it is a cron."""
    trigger = recurring.trigger
    if trigger and trigger.cron_schedule and trigger.cron_schedule.cron:
        cron = trigger.cron_schedule.cron
        return f"cron {cron!r}", next_runs(cron)
    if trigger and trigger.periodic_schedule:
        return f"every {trigger.periodic_schedule.interval_second}s", []
    return "no trigger", []
