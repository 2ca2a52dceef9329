"""The one error contract of every `sft-jax` command.

A user error (config, data, model, checkpoint, workdir, hub, permissions) is
an exception deriving from `UserError`; the command dispatcher
(`sft_jax/cli.py`) prints it as one line and exits with `EXIT_USAGE`:

  sft-jax COMMAND: <what>: <file/line/key>: <reason and the fix>

`what` is the error's kind ("config", "data", "model", ...); the message
itself starts with the place (a file, `file:line`, or a config key). Anything
else escaping a command is a bug and keeps its traceback.

`user_error_of(exc)` also recognises the library errors that mean a user
error (a missing file, a permission, a corrupt JSON file) and gives them the
same form.
"""

import errno
import json
import os

# Exit codes of every command (documented in the README).
EXIT_OK = 0  # Finished.
EXIT_BUG = 1  # An unexpected error (a bug): a traceback was printed.
EXIT_USAGE = 2  # A user error: one line on stderr says what and where.
EXIT_NONFINITE = 3  # train: a non-finite loss stopped the run.
EXIT_PEER_FAILED = 4  # multi-host: another process failed or hung; rerun resumes.
EXIT_PREEMPTED = 75  # train: stopped by SIGTERM/SIGINT, saved; rerun resumes.
EXIT_INTERRUPTED = 130  # Ctrl-C outside training (nothing to save).


class UserError(Exception):
  """An error the user can fix; `str(e)` is "<place>: <reason and fix>"."""
  what = "error"

  def __init__(self, message: str, *, what: str | None = None):
    super().__init__(message)
    if what is not None:
      self.what = what


class PeerFailedError(Exception):
  """Multi-host: another process failed, hung or never arrived; this one
  stops with one line (EXIT_PEER_FAILED) instead of waiting forever."""
  what = "distributed"


class WorkdirError(UserError):
  """The run directory cannot be used (a file, read-only, no checkpoint)."""
  what = "workdir"


class ResumeError(UserError):
  """Resuming would silently continue something other than the run."""
  what = "resume"


def _os_error(e: OSError) -> UserError:
  place = e.filename if e.filename is not None else ""
  reason = e.strerror or str(e)
  fix = {
      errno.ENOENT: "check the path",
      errno.EACCES: "check its permissions or choose another path",
      errno.EPERM: "check its permissions or choose another path",
      errno.EROFS: "the file system is read-only; choose a writable path",
      errno.ENOSPC: "free some space or choose another disk",
      errno.ENOTDIR: "a directory was expected; remove the file or choose "
                     "another path",
      errno.EEXIST: "remove it or choose another path",
      errno.EISDIR: "a file was expected, not a directory",
  }.get(e.errno)
  text = f"{place}: {reason}" if place else reason
  return UserError(f"{text}; {fix}" if fix else text, what="file")


def user_error_of(exc: BaseException) -> UserError | None:
  """`exc` as a UserError when it means one, else None (a bug)."""
  if isinstance(exc, UserError):
    return exc
  hub = _hub_error(exc)
  if hub is not None:
    return hub
  if isinstance(exc, OSError) and exc.errno in (
      errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
      errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.EDQUOT):
    return _os_error(exc)
  return None


def _hub_error(exc: BaseException) -> UserError | None:
  """Hub client errors (bad id, unknown repo, offline, gated) are the user's."""
  try:
    from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  kinds = tuple(getattr(hub_errors, n) for n in (
      "HFValidationError", "RepositoryNotFoundError", "GatedRepoError",
      "LocalEntryNotFoundError", "RevisionNotFoundError",
      "OfflineModeIsEnabled") if hasattr(hub_errors, n))
  seen = exc
  while seen is not None:  # transformers wraps them in OSError/ValueError
    if isinstance(seen, kinds):
      first = str(seen).strip().splitlines()[0] if str(seen).strip() else ""
      return UserError(f"{first} ({type(seen).__name__}); check the hub id, "
                       "or give a local directory (offline: HF_HUB_OFFLINE=1 "
                       "needs the model in the local cache)", what="hub")
    seen = seen.__cause__ or seen.__context__
  return None


def read_json(path, what: str = "file") -> object:
  """Reads a JSON file; a corrupt one is a UserError naming file:line."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})",
                    what=what) from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column "
                    f"{e.colno}); the file is corrupt or not JSON",
                    what=what) from None


def check_writable_dir(path: str, what: str = "workdir") -> None:
  """Raises WorkdirError unless `path` is (or can be made) a writable dir."""
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  if os.path.exists(probe) and not os.path.isdir(probe):
    raise WorkdirError(f"{probe}: is a file, not a directory; choose another "
                       "path", what=what)
  if not os.access(probe, os.W_OK | os.X_OK):
    raise WorkdirError(f"{probe}: not writable (permission denied); choose "
                       "a writable directory", what=what)
