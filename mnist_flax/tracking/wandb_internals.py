"""Every use of a private name of wandb, in one place, with the wandb version it was checked against.

wandb's public API has no way to do these three things, so they use its internals:
  - `Run._console_stop()`: stop forwarding stdout/stderr to wandb's service once the service has died
    (run.finish() calls it only when it succeeds);
  - `Run._wl._asyncer`: the thread `wandb.teardown()` joins, joined here when teardown fails at a dead service;
  - `wandb.proto.wandb_internal_pb2.Record`: the record type of a `.wandb` run file (tracking/wandb_files.py);
  - `Run._log_artifact(..., use_after_commit=True)`: what `Run.use_artifact` does with a new artifact online,
    done here in an offline run too, where `use_artifact` refuses: the run's file records the artifact as the
    run's input, and `wandb sync` commits it and declares the use;
  - `wandb.sdk.lib.wbauth.read_netrc_auth` and `wandb_setup.singleton().settings`: the key `wandb login` stored
    (its netrc, or its settings) for the server this process would use, read without prompting or the network;
  - the class names of wandb's service-connection errors (`stream_failed`): a lost service stops W&B for the
    rest of the run, a refused artifact only that artifact.
`check(run)` runs when a run starts: a name that a new wandb changed or dropped becomes one warning, never a
crash, and each use below degrades to doing nothing.
"""

import contextlib
import io

CHECKED_WITH = "0.31.0"  # the wandb these names were read in (uv.lock pins it); read them again when upgrading


def check(run) -> list[str]:
    """The private names this module uses that `run`'s wandb lacks; one warning line on stderr when any."""
    import sys

    import wandb

    missing = []
    if not callable(getattr(run, "_console_stop", None)):
        missing.append("Run._console_stop")
    if getattr(getattr(run, "_wl", None), "_asyncer", None) is None:
        missing.append("Run._wl._asyncer")
    if not callable(getattr(run, "_log_artifact", None)):
        missing.append("Run._log_artifact")
    if record_type() is None:
        missing.append("wandb.proto.wandb_internal_pb2.Record")
    if _netrc_reader() is None:
        missing.append("wandb.sdk.lib.wbauth.read_netrc_auth")
    if missing:
        print(
            f"warning: wandb {wandb.__version__} lacks {', '.join(missing)} (mnist_flax/tracking/wandb_internals.py "
            f"was checked with wandb {CHECKED_WITH}); training and tracking go on, but after a W&B failure the "
            "run's exit may be noisy, and .wandb files may not be readable",
            file=sys.stderr,
            flush=True,
        )
    return missing


def record_type():
    """The protobuf class of a `.wandb` file's records, or None when this wandb has none by that name."""
    try:
        from wandb.proto import wandb_internal_pb2
    except ImportError:
        return None
    return getattr(wandb_internal_pb2, "Record", None)


def _netrc_reader():
    """wandb's `read_netrc_auth(host=...)`, or None when this wandb has none by that name."""
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:
        return None
    return getattr(wbauth, "read_netrc_auth", None)


def stored_api_key() -> str | None:
    """The API key `wandb login` stored, as wandb itself finds it after WANDB_API_KEY: its netrc entry for the
    server (WANDB_BASE_URL or wandb's settings), then an api_key in wandb's settings files; None when there is
    none or this wandb reads them otherwise. Never prompts, never asks the server."""
    read_netrc = _netrc_reader()
    try:
        from wandb.sdk import wandb_setup

        settings = wandb_setup.singleton().settings
        key = read_netrc(host=settings.base_url) if read_netrc else None
        return (key or settings.api_key or "").strip() or None
    except Exception:  # a malformed netrc or settings file, or another wandb: no stored key
        return None


def use_new_artifact(run, artifact, offline: bool) -> None:
    """Declares a new (draft) artifact as the run's input, online or offline."""
    if not offline:
        run.use_artifact(artifact)  # public: logs it, then declares the use
        return
    run._log_artifact(artifact, is_user_created=True, use_after_commit=True)


# wandb's own names for "the connection to its service is gone" (wandb 0.31: sdk/mailbox, sdk/lib/service, errors).
SERVICE_ERRORS = frozenset(
    {
        "MailboxClosedError",
        "HandleAbandonedError",
        "WandbServiceConnectionError",
        "WandbAttachFailedError",
        "WandbCoreNotAvailableError",
    }
)


def stream_failed(error: Exception) -> bool:
    """Whether `error` says the run's own stream is gone (W&B's service dead, the connection lost), as opposed to
    one request the server refused (an artifact it rejects, a quota): matched by class, not by message. A stream
    failure taken for a refusal costs nothing: the next metric sent fails too, and stops W&B then."""
    if isinstance(error, (ConnectionError, EOFError)):
        return True
    return any(cls.__name__ in SERVICE_ERRORS for cls in type(error).__mro__)


def stop_console(run) -> None:
    """Stops wandb forwarding printed lines to its service (a dead one: each line would raise there)."""
    with contextlib.suppress(Exception):
        run._console_stop()


def stop_broken_wandb(run) -> None:
    """After W&B's service died: stops every W&B thread and hook in this process, so none outlives the run.

    run.finish() and wandb.teardown() each stop at their first message to the dead service, before they restore
    sys.stdout/sys.stderr and before teardown joins W&B's asyncio thread (a daemon thread). Left so, every line
    printed afterwards (the final summary) schedules a task on that thread, and each task re-raises W&B's cached
    ConnectionResetError with `with_traceback(...)`, which frees the traceback it carried until then. That
    traceback holds the loop's frames, and so the training's JAX arrays: they were freed on W&B's thread,
    racing with interpreter shutdown. A JAX array's C++ destructor releases the GIL; once the main thread is
    finalizing, CPython ends a thread that asks for the GIL back with pthread_exit, whose forced unwind cannot
    pass the noexcept destructor: std::terminate, "FATAL: exception not rethrown", SIGABRT after a finished run
    (found with a core dump; tests/test_faults.py kills W&B's service mid-run).

    """
    import wandb

    asyncer = getattr(getattr(run, "_wl", None), "_asyncer", None)
    stop_console(run)  # stop forwarding stdout/stderr to the dead service
    with contextlib.suppress(Exception), contextlib.redirect_stderr(io.StringIO()):
        wandb.teardown()  # unregisters wandb's atexit hook, then fails at the service before joining its thread
    if asyncer is not None:
        with contextlib.suppress(Exception):
            # The queued tasks fail at once (the mailbox closed with the connection); then the thread ends, and
            # nothing of W&B runs Python after this, so nothing is freed on its thread at exit.
            asyncer.join()
