"""The Optuna side of a sweep: the study's storage, its queue of planned trials, heartbeats and pruning.

Every planned trial is queued once, when the study is created: each grid point,
or N empty trials for random/TPE sampling (the sampler fills their parameters
when a worker takes one, from every trial finished so far). A worker takes a
queued trial by moving it from WAITING to RUNNING, which the storage does for
one caller only, so many workers on many machines run each trial once (Optuna's
own GridSampler may run a point twice when workers start together, as its docs
say). A running trial's worker writes a heartbeat; a trial whose heartbeat
stops (its worker was killed) is failed by the next worker that looks, and a
copy with the same parameters is queued: the retry trains in the same workdir,
so it resumes from the last checkpoint.

The storage is any SQLAlchemy URL: `--storage`, else MNIST_FLAX_STORAGE, else
SQLite in the sweep root. A PostgreSQL URL needs no password in it: psycopg 3
calls libpq, which takes the password from PGPASSWORD or ~/.pgpass (PGPASSFILE),
in the worker and in each trial's main.py, whose environment is the worker's.

Pruning runs inside the trial's own `main.py`: the worker names the trial in
the environment (MNIST_FLAX_TRIAL), and `reporter_from_environment` gives
`train_and_evaluate` a validation callback that reports each epoch's
validation accuracy to the study and stops the run (errors.Pruned) when the
pruner says so.
"""

import json
import os
import re
import threading
import time
import warnings

from mnist_flax.errors import ConfigError, Pruned

TRIAL_ENV = "MNIST_FLAX_TRIAL"
STORAGE_ENV = "MNIST_FLAX_STORAGE"  # the study's URL when --storage is not given: off the command line
# Said when --storage's URL holds a password: where it shows, and how to give it instead.
PASSWORD_IN_ARGV = (
    "warning: the --storage URL holds a password, which ps, the shell history and the Slurm job's record show; "
    "give postgresql://USER@HOST/DB with the password in ~/.pgpass or PGPASSWORD, "
    f"or the whole URL in {STORAGE_ENV}"
)
PRUNERS = ("median", "halving", "none")
SAMPLERS = ("grid", "random", "tpe")
# How PostgreSQL and SQLite say that another worker created Optuna's tables (or its schema version) first.
SCHEMA_RACE = ("UniqueViolation", "UNIQUE constraint failed", "already exists")
# USER:PASSWORD@ in a URL SQLAlchemy cannot read (to the last @: hide too much rather than too little).
PASSWORD_IN_TEXT = re.compile(r"(://[^/:@]*):.*@")
METRIC = "best_val_accuracy"  # the objective: the run's best validation accuracy (maximised)


def load_optuna():
    import optuna  # noqa: PLC0415 (a run outside a sweep never imports it)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats, their retry callback and fail_stale_trials are marked experimental since Optuna 2.8/2.9;
    # they are what makes a dead worker's trial come back, and the tests hold them to it.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---------------------------------------------------------------- storage and study


def storage_url(root: str, storage: str | None) -> tuple[str, str]:
    """The study's SQLAlchemy URL and where it came from: --storage, else MNIST_FLAX_STORAGE, else SQLite in ROOT."""
    if storage:
        return storage, "--storage"
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV], STORAGE_ENV
    return f"sqlite:///{os.path.abspath(os.path.join(root, 'study.db'))}", "--storage"


def _parse_url(url: str):
    try:
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        return make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: open_storage says so
        return None


def has_password(url: str) -> bool:
    """Whether the URL carries a password (USER:PASSWORD@HOST, or ?password=)."""
    parsed = _parse_url(url)
    if parsed is None:
        return bool(PASSWORD_IN_TEXT.search(url))
    return bool(parsed.password or parsed.query.get("password"))


def shown_url(url: str) -> str:
    """The URL without its password, for logs and records (USER:***@HOST where it holds one)."""
    parsed = _parse_url(url)
    if parsed is None:
        return PASSWORD_IN_TEXT.sub(r"\1:***@", url)
    return parsed.difference_update_query(["password"]).render_as_string(hide_password=True)


def without_password(url: str) -> str:
    """The URL with no password at all: USER:PASSWORD@HOST, USER:***@HOST and USER@HOST name one database."""
    parsed = _parse_url(url)
    if parsed is None:
        return PASSWORD_IN_TEXT.sub(r"\1@", url)
    # URL.set(password=None) would keep the password; the URL is a named tuple.
    return parsed.difference_update_query(["password"])._replace(password=None).render_as_string()


def open_storage(url: str, heartbeat: float, given_as: str = "--storage"):
    """Optuna's RDB storage with heartbeats; a trial silent for 2 heartbeats is failed and queued again.

    `given_as` names where the URL came from (--storage or MNIST_FLAX_STORAGE) in the error.
    """
    optuna = load_optuna()
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=max(1, round(heartbeat)),
                grace_period=max(2, round(2 * heartbeat)),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
        except ImportError as e:  # no driver for this database
            error = e
            break
        except Exception as e:  # no server, wrong password, or two workers creating Optuna's tables at once
            error = e
            if not any(sign in str(e) for sign in SCHEMA_RACE):
                break
            time.sleep(0.5 * (attempt + 1))  # the other worker's tables are there now: open them
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "no password supplied" in first or "password authentication failed" in first:
        first += " (the password comes from the URL, PGPASSWORD or ~/.pgpass)"
    raise ConfigError(f"{given_as} {shown_url(url)}: cannot open the study's storage: {first}") from None


def make_pruner(spec: dict):
    optuna = load_optuna()
    name = spec["name"]
    if name == "median":
        startup, warmup = spec["startup_trials"], spec["warmup_epochs"]
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, spec["warmup_epochs"]))
    return optuna.pruners.NopPruner()


def make_sampler(name: str, seed: int | None):
    optuna = load_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every trial is queued with its point


def open_study(storage, name: str, plan: dict, planned: list[dict], wait: float = 120.0):
    """Creates the study and queues its trials, or loads it; refuses a study that holds a different sweep.

    `planned` is each trial's fixed parameters ({} where the sampler chooses). Of several workers starting
    together one creates the study; the others wait until its trials are queued.
    """
    optuna = load_optuna()
    pruner = make_pruner(plan["pruner"])
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        created = False
    if created:
        study.set_user_attr("plan", plan)
        for params in planned:
            study.enqueue_trial(params)
        study.set_user_attr("queued", len(planned))
        return study
    deadline = time.monotonic() + wait
    while "queued" not in study.user_attrs:
        if time.monotonic() > deadline:
            raise ConfigError(f"study {name!r} exists but its trials were never queued (its creator stopped?)")
        time.sleep(0.5)
    if study.user_attrs.get("plan") != plan:
        differences = _plan_difference(study.user_attrs.get("plan") or {}, plan)
        raise ConfigError(f"study {name!r} in {shown_url(storage.url)} holds a different sweep ({differences})")
    return study


def _plan_difference(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in keys) or "?"


# ---------------------------------------------------------------- taking and running trials


def take_trial(study, storage, sampler_name: str, seed: int | None):
    """The next queued trial, now RUNNING for this worker only, and its storage id; None when the queue is empty."""
    optuna = load_optuna()
    study_id = storage.get_study_id_from_name(study.study_name)
    # Read through the study: Optuna's storage cache in front of the database learns each trial's id here.
    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING):
                continue  # another worker took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.record_heartbeat(trial_id)
        # One sampler per trial, seeded by the trial's number: the same sweep samples the same points
        # whichever worker takes which trial.
        study.sampler = make_sampler(sampler_name, None if seed is None else seed + frozen.number)
        return optuna.Trial(study, trial_id), trial_id
    return None


def original_number(storage, trial_id: int) -> int:
    """The number of the trial a retry repeats (its own number otherwise): the retry's workdir is that trial's."""
    frozen = storage.get_trial(trial_id)
    retried = load_optuna().storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return frozen.number if retried is None else retried


def retry_now(study, trial) -> None:
    """Fails a trial whose worker is stopping (preempted) and queues its retry at once, not after the grace period."""
    optuna = load_optuna()
    frozen = study.tell(trial, state=optuna.trial.TrialState.FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)(study, frozen)


def fail_stale(study) -> None:
    """Fails the trials whose workers stopped beating; their retries are queued."""
    load_optuna().storages.fail_stale_trials(study)


def counts(study) -> dict[str, int]:
    """How many trials are in each state (a retried failure counts once, as its retry)."""
    states = {}
    for trial in latest_attempts(study):
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    return states


def latest_attempts(study) -> list:
    """The latest attempt of each planned trial, by the number of the trial it repeats."""
    optuna = load_optuna()
    latest = {}
    for trial in study.get_trials(deepcopy=False):
        number = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
        latest[trial.number if number is None else number] = trial
    return [latest[n] for n in sorted(latest)]


class Heartbeat:
    """Records the trial's heartbeat every interval while the trial's process runs."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a storage hiccup: the next beat tries again; a long one fails the trial, as it should
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- the trial's own process


def trial_environment(url: str, study_name: str, trial_id: int, pruner: dict) -> dict[str, str]:
    """What the worker puts in a trial's environment so that its main.py reports to the study."""
    return {TRIAL_ENV: json.dumps({"storage": url, "study": study_name, "trial_id": trial_id, "pruner": pruner})}


def reporter_from_environment() -> tuple:
    """The validation callbacks of a run that is a sweep trial (MNIST_FLAX_TRIAL set), else none."""
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return ()
    try:
        spec = json.loads(text)
        return (Reporter(spec["storage"], spec["study"], int(spec["trial_id"]), spec["pruner"]),)
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{TRIAL_ENV} is set but is not a sweep's trial description: {text[:80]!r}") from None


class Reporter:
    """Reports each validation accuracy to the trial, at its epoch; raises Pruned when the pruner says stop."""

    def __init__(self, url: str, study_name: str, trial_id: int, pruner: dict):
        self.url, self.study_name, self.trial_id, self.pruner = url, study_name, trial_id, pruner
        self._trial = None

    def _connect(self):
        optuna = load_optuna()
        storage = optuna.storages.RDBStorage(self.url, skip_compatibility_check=True)
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            pruner=make_pruner(self.pruner),
            sampler=optuna.samplers.RandomSampler(),  # never asked: the worker suggested the parameters
        )
        return optuna.Trial(study, self.trial_id)

    def __call__(self, step: int, report: dict) -> None:
        if self._trial is None:
            self._trial = self._connect()
        epoch, accuracy = int(round(report["epoch"])), float(report["accuracy"])
        self._trial.report(accuracy, epoch)
        if self._trial.should_prune():
            raise Pruned(
                f"pruned by the sweep's {self.pruner['name']} pruner after epoch {epoch} "
                f"(validation accuracy {accuracy:.4f}, step {step})"
            )
