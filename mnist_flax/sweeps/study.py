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

from mnist_flax import layout
from mnist_flax.errors import ConfigError, Pruned, StorageUnavailable, first_line

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
    return f"sqlite:///{os.path.abspath(os.path.join(root, layout.STUDY_DB))}", "--storage"


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
    first = first_line(error)
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


def take_trial(study, storage, sampler_name: str, seed: int | None, call=None):
    """The next queued trial, now RUNNING for this worker only, and its storage id; None when the queue is empty.

    `call` runs each storage call (Patience.call: an outage is waited out call by call, so a trial taken is
    never lost between taking it and its first heartbeat).
    """
    call = call or (lambda function, *args, **kwargs: function(*args, **kwargs))
    optuna = load_optuna()
    study_id = call(storage.get_study_id_from_name, study.study_name)
    # Read through the study: Optuna's storage cache in front of the database learns each trial's id here.
    for frozen in call(study.get_trials, deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial_id = call(storage.get_trial_id_from_study_id_trial_number, study_id, frozen.number)
        try:
            if not call(storage.set_trial_state_values, trial_id, state=optuna.trial.TrialState.RUNNING):
                continue  # another worker took it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        call(storage.record_heartbeat, trial_id)
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


def tell_once(study, storage, trial, trial_id: int, *args, **kwargs):
    """study.tell, told once even when called again: a tell whose answer an outage cut off may have got through,
    and then the repeat finds the trial finished. Returns the trial as stored."""
    try:
        study.tell(trial, *args, **kwargs)
    except Exception as e:
        if is_outage(e) or not storage.get_trial(trial_id).state.is_finished():
            raise
    return storage.get_trial(trial_id)


def retry_now(study, storage, trial, trial_id: int) -> None:
    """Fails a trial whose worker is stopping (preempted) and queues its retry at once, not after the grace period.

    Safe to call again: the retry is queued once (its copy names the trial it repeats).
    """
    optuna = load_optuna()
    frozen = tell_once(study, storage, trial, trial_id, state=optuna.trial.TrialState.FAIL)
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback
    if any(frozen.number in callback.retry_history(other) for other in study.get_trials(deepcopy=False)):
        return
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


def is_outage(error: BaseException) -> bool:
    """Whether an error means the database is away (refused, dropped, timed out), not that a call was wrong.

    Optuna wraps SQLAlchemy's errors in StorageInternalError; SQLAlchemy wraps the driver's. The chain is
    searched for the connection-level ones: OperationalError and InterfaceError (psycopg's and sqlite3's too).
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ in ("OperationalError", "InterfaceError") or getattr(
            error, "connection_invalidated", False
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reason(error: BaseException) -> str:
    return first_line(error, cause=True)


class Patience:
    """Rides out an outage of the study's storage for up to `seconds`: every storage call of the worker goes
    through `call`, which retries with backoff; one line when the storage goes away, one when it is back.

    Shared by the worker's thread and its heartbeat's: an outage is one outage whichever call saw it first.
    Past the patience, `call` raises StorageUnavailable (and `lost` is true for the heartbeat to act on).
    """

    def __init__(self, seconds: float, say=print):
        self.seconds, self.say = seconds, say
        self.down_since = None  # monotonic time of the first failure of the outage under way
        self.last_failure = float("-inf")  # monotonic time of the latest failed call

    def failed(self, error: BaseException) -> float:
        """Notes a failed call; returns how long the storage has been away."""
        now = time.monotonic()
        self.last_failure = now
        if self.down_since is None:
            self.down_since = now
            self.say(
                f"the study's storage is unreachable ({_reason(error)}); waiting for it for up to "
                f"{self.seconds:g} s (--storage-patience); training goes on",
                flush=True,
            )
        return now - self.down_since

    def succeeded(self) -> None:
        if self.down_since is not None:
            self.say(f"the study's storage is back after {time.monotonic() - self.down_since:.0f} s", flush=True)
            self.down_since = None

    @property
    def lost(self) -> bool:
        return self.down_since is not None and time.monotonic() - self.down_since > self.seconds

    def steady(self, seconds: float) -> bool:
        """Whether no storage call failed in the last `seconds` (so others' heartbeats had time to come back)."""
        return time.monotonic() - self.last_failure > seconds

    def call(self, function, *args, **kwargs):
        delay = 0.5
        while True:
            try:
                result = function(*args, **kwargs)
            except Exception as e:
                if not is_outage(e):
                    raise
                away = self.failed(e)
                if away > self.seconds:
                    raise StorageUnavailable(
                        f"the study's storage has been unreachable for {away:.0f} s, longer than "
                        f"--storage-patience {self.seconds:g} s ({_reason(e)})"
                    ) from None
                time.sleep(min(delay, self.seconds - away + 0.1))
                delay = min(2 * delay, 10.0)
                continue
            self.succeeded()
            return result


class Heartbeat:
    """Records the trial's heartbeat every interval while the trial's process runs.

    A beat that fails is counted as part of an outage (`patience`); once the outage outlasts the patience,
    `on_lost` is called once (the worker stops the trial with a checkpoint).
    """

    def __init__(self, storage, trial_id: int, interval: float, patience: Patience | None = None, on_lost=None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.patience, self.on_lost = patience, on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        # While the storage is away, look more often than every interval, so the patience is kept to.
        while not self._stop.wait(
            min(self.interval, 2.0) if self.patience and self.patience.down_since else self.interval
        ):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a late beat is harmless; the trial goes on training
                if self.patience is None:
                    continue
                self.patience.failed(e)
                if self.patience.lost and self.on_lost:
                    self.on_lost()
                    self.on_lost = None
            else:
                if self.patience:
                    self.patience.succeeded()

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


def reporter_from_environment(last_epoch: int | None = None) -> tuple:
    """The validation callbacks of a run that is a sweep trial (MNIST_FLAX_TRIAL set), else none.

    `last_epoch` (the run's num_epochs): the validation of that epoch is reported but never pruned.
    """
    text = os.environ.get(TRIAL_ENV)
    if not text:
        return ()
    try:
        spec = json.loads(text)
        return (Reporter(spec["storage"], spec["study"], int(spec["trial_id"]), spec["pruner"], last_epoch),)
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{TRIAL_ENV} is set but is not a sweep's trial description: {text[:80]!r}") from None


class Reporter:
    """Reports each validation accuracy to the trial, at its epoch; raises Pruned when the pruner says stop.

    Never at the last epoch: pruning there saves nothing, and the trial completes with its value. While the
    storage is away the trial trains on: each report waits (one line says so) and is delivered, in order,
    at the next validation that reaches the storage; no pruning decision is taken meanwhile.
    """

    def __init__(self, url: str, study_name: str, trial_id: int, pruner: dict, last_epoch: int | None = None):
        self.url, self.study_name, self.trial_id, self.pruner = url, study_name, trial_id, pruner
        self.last_epoch = last_epoch
        self._trial = None
        self._pending: list[tuple[float, int]] = []
        self._away = False

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
        epoch, accuracy = int(round(report["epoch"])), float(report["accuracy"])
        self._pending.append((accuracy, epoch))
        try:
            if self._trial is None:
                self._trial = self._connect()
            while self._pending:
                self._trial.report(*self._pending[0])
                self._pending.pop(0)
            prune = (self.last_epoch is None or epoch < self.last_epoch) and self._trial.should_prune()
        except Exception as e:
            if not is_outage(e):
                raise
            if not self._away:
                print(
                    f"warning: the study's storage is unreachable ({_reason(e)}); epoch {epoch}'s validation "
                    "accuracy is reported when it is back, and the trial trains on",
                    flush=True,
                )
            self._away = True
            return
        if self._away:
            print(f"the study's storage is back: reports delivered up to epoch {epoch}", flush=True)
            self._away = False
        if prune:
            raise Pruned(
                f"pruned by the sweep's {self.pruner['name']} pruner after epoch {epoch} "
                f"(validation accuracy {accuracy:.4f}, step {step})"
            )
