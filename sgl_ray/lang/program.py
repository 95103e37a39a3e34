"""``@function`` programs: ``run`` one, ``run_batch`` many, and the default backend they run on."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.lang.backends.base import Backend
from sgl_ray.lang.ir import GenParams
from sgl_ray.lang.state import ProgramState


class _DefaultBackend:
    """The process-wide default backend (what ``set_default_backend`` sets), guarded by a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.backend: Backend | None = None

    def set(self, backend: Backend | None) -> None:
        with self._lock:
            self.backend = backend


_DEFAULT = _DefaultBackend()


def set_default_backend(backend: Backend | None) -> None:
    """The backend programs run on when ``run`` gets none. Example::

    >>> set_default_backend(RuntimeEndpoint("http://127.0.0.1:8000"))  # doctest: +SKIP
    """
    if backend is not None and not isinstance(backend, Backend):
        raise InvalidRequestError(f"not a backend: {type(backend).__name__}")
    _DEFAULT.set(backend)


def get_default_backend() -> Backend | None:
    return _DEFAULT.backend


class SglFunction:
    """A program: a Python function whose first argument is the state ``s``. Made by :func:`function`."""

    def __init__(self, func: Callable[..., Any]) -> None:
        params = list(inspect.signature(func).parameters)
        if not params:
            raise InvalidRequestError(f"{func.__name__} must take the program state as its first argument")
        self.func = func
        self.arg_names = params[1:]
        functools.update_wrapper(self, func)

    def run(
        self,
        *args: Any,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        frequency_penalty: float | None = None,
        presence_penalty: float | None = None,
        ignore_eos: bool | None = None,
        seed: int | None = None,
        stream: bool = False,
        backend: Backend | None = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program with ``args``/``kwargs``. Sampling keywords are defaults for every ``gen`` that does
        not set them. Blocks until the program ends and raises its error, unless ``stream=True``: then it returns
        at once and ``state.text_iter()`` yields the text as it is generated."""
        defaults = GenParams(
            max_new_tokens=max_new_tokens,
            stop=stop,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            ignore_eos=ignore_eos,
            seed=seed,
        )
        state = ProgramState(_resolve(backend), defaults, stream=stream)
        if stream:
            state._program_done.clear()
            threading.Thread(target=self._execute, args=(state, args, kwargs), daemon=True).start()
            return state
        self._execute(state, args, kwargs)
        if state._error is not None:
            raise state._error
        return state

    def _execute(self, state: ProgramState, args: tuple, kwargs: dict) -> None:
        error = None
        try:
            self.func(state, *args, **kwargs)
            state.sync()
        except BaseException as e:  # the state keeps it; run() re-raises it
            error = e
        finally:
            state._finish(error)

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any]],
        *,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        backend: Backend | None = None,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per dict of arguments, ``num_threads`` at a time (``"auto"``: up to 64), and
        return the states in input order. The server batches the concurrent requests (continuous batching) and
        shares their common prefixes. The first error of any program is raised after all of them end."""
        if not isinstance(batch_kwargs, (list, tuple)) or not all(isinstance(k, dict) for k in batch_kwargs):
            raise InvalidRequestError("run_batch takes a list of keyword-argument dicts")
        if not batch_kwargs:
            return []
        if num_threads == "auto":
            workers = min(64, len(batch_kwargs))
        elif isinstance(num_threads, int) and num_threads >= 1:
            workers = num_threads
        else:
            raise InvalidRequestError(
                f"num_threads must be 'auto' or a positive integer, got {num_threads!r}"
            )
        be = _resolve(backend)

        def one(kw: dict[str, Any]) -> ProgramState:
            return self.run(**kw, **sampling, backend=be)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(one, kw) for kw in batch_kwargs]
            if progress_bar:
                from tqdm import tqdm

                for f in tqdm(futures, total=len(futures), desc=self.__name__):
                    f.exception()
            return [f.result() for f in futures]

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        """Same as :meth:`run`."""
        return self.run(*args, **kwargs)


def _resolve(backend: Backend | None) -> Backend:
    backend = backend or _DEFAULT.backend
    if backend is None:
        raise InvalidRequestError("no backend: pass backend= or call sgl_ray.lang.set_default_backend(...)")
    return backend


def function(func: Callable[..., Any] | None = None) -> Any:
    """Make a program from a function whose first argument is the state.

    Example::

        >>> from sgl_ray.lang import function, gen, user, assistant
        >>> @function
        ... def qa(s, question):
        ...     s += user(question)
        ...     s += assistant(gen("answer", max_tokens=32))
        >>> qa.run("What is 2+2?")["answer"]  # doctest: +SKIP
    """
    if func is None:
        return SglFunction
    return SglFunction(func)
