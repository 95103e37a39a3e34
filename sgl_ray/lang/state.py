"""``ProgramState``: the ``s`` a program appends to, and the forks that share its prefix.

Each state runs its appends in order on its own worker thread, so ``s += gen(...)`` returns at once and sibling
forks generate in parallel; reading (``s["name"]``, ``s.text()``) waits for the appends before it. An append
that fails stops the state: later appends are skipped and the next read (or the end of ``run``) raises the error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sgl_ray.errors import InvalidRequestError
from sgl_ray.function_call import ToolCall
from sgl_ray.lang.backends.base import Backend, Prompt
from sgl_ray.lang.choices import decision_meta
from sgl_ray.lang.images import ImageRef, chat_messages
from sgl_ray.lang.ir import (
    Concat,
    Expr,
    Gen,
    GenParams,
    ImageExpr,
    RoleBegin,
    RoleEnd,
    Select,
    Text,
    as_expr,
)
from sgl_ray.lang.template import RoleFormat

_END = object()


class _Worker:
    """One daemon thread running a state's appends in submission order."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], None]) -> None:
        with self._cv:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="sgl-ray-lang-state")
                self._thread.start()
        self._q.put(fn)

    def _loop(self) -> None:
        while (fn := self._q.get()) is not None:
            try:
                fn()
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def wait(self) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._pending == 0)

    def close(self) -> None:
        with self._cv:
            if self._thread is not None:
                self._q.put(None)
                self._thread = None


class ProgramState:
    """The state of one running program. Append with ``+=``; read with ``s["name"]``, ``text()``,
    ``messages()``, ``get_meta_info(name)``, ``tool_calls(name)``; ``fork(n)`` branches it.

    Example::

        >>> @function
        ... def qa(s, question):
        ...     s += user(question)
        ...     s += assistant(gen("answer", max_tokens=32))
        >>> state = qa.run("What is 2+2?", backend=RuntimeEndpoint("http://127.0.0.1:8000"))  # doctest: +SKIP
        >>> state["answer"]  # doctest: +SKIP
    """

    def __init__(self, backend: Backend, defaults: GenParams, stream: bool = False) -> None:
        self.backend = backend
        self.defaults = defaults
        self._format: RoleFormat | None = None
        self._text = ""
        self._messages: list[dict[str, str]] = []
        self._images: list[ImageRef] = []  # every image() of the text, in order
        self._role: str | None = None
        self._role_start = 0
        self._roles_seen = False
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, Any] = {}
        self._calls: dict[str, list[ToolCall]] = {}
        self._error: BaseException | None = None
        self._worker = _Worker()
        self._children: list[ProgramState] = []
        self._stream: queue.SimpleQueue | None = queue.SimpleQueue() if stream else None
        self._program_done = threading.Event()
        self._program_done.set()

    # --- appending -----------------------------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> ProgramState:
        expr = as_expr(other)
        self._worker.submit(lambda: self._run_op(expr))
        return self

    def _run_op(self, expr: Expr) -> None:
        if self._error is not None:
            return
        try:
            self._exec(expr)
        except BaseException as e:  # surfaced by the next read or by run()
            self._error = e

    def _exec(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._append(expr.value)
        elif isinstance(expr, Concat):
            for item in expr.items:
                self._exec(item)
        elif isinstance(expr, RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, ImageExpr):
            self._image(expr)
        else:
            raise InvalidRequestError(f"cannot append {type(expr).__name__}")

    def _append(self, text: str, var: str | None = None, emit: bool = True) -> None:
        self._text += text
        if emit and self._stream is not None and text:
            self._stream.put((var, text))

    def role_format(self) -> RoleFormat:
        if self._format is None:
            self._format = self.backend.role_format()
        return self._format

    def _role_begin(self, role: str) -> None:
        if self._role is not None:
            raise InvalidRequestError(f"cannot start a {role} turn inside the open {self._role} turn")
        fmt = self.role_format()
        if (
            role == "system"
            and fmt.name == "chat_template"
            and not (fmt.prefix["system"] or fmt.suffix["system"])
        ):
            raise InvalidRequestError("this model's chat template has no system role", param="system")
        if not self._roles_seen and not self._text:  # the conversation starts: BOS, default system turn
            self._append(fmt.begin + (fmt.default_system if role != "system" else ""))
        self._roles_seen = True
        self._append(fmt.prefix.get(role, ""))
        self._role, self._role_start = role, len(self._text)

    def _role_end(self, role: str) -> None:
        if self._role != role:
            raise InvalidRequestError(f"{role}_end() without an open {role} turn (open: {self._role})")
        self._messages.append({"role": role, "content": self._text[self._role_start :]})
        self._role = None
        self._append(self.role_format().suffix.get(role, ""))

    def _prompt(self) -> Prompt:
        open_content = self._text[self._role_start :] if self._role else ""
        return Prompt(self._text, list(self._messages), self._role, open_content, tuple(self._images))

    def _image(self, expr: ImageExpr) -> None:
        token = self.backend.image_token()  # raises for a model without image inputs
        self._images.append(ImageRef(expr.source, len(self._messages) if self._role else None))
        self._append(token)

    def _gen(self, expr: Gen) -> None:
        params = expr.params.merged(self.defaults)
        sink = None
        if self._stream is not None:
            stream = self._stream
            sink = lambda delta: stream.put((expr.name, delta))  # noqa: E731
        if expr.tools is None:
            result = self.backend.generate(self._prompt(), params, sink)
        else:
            result = self.backend.generate(self._prompt(), params, sink, tools=expr.tools)
        self._append(result.text, expr.name, emit=sink is None)
        if expr.name is not None:
            self._vars[expr.name] = result.text
            self._meta[expr.name] = result.meta_info
            if result.tool_calls is not None:
                self._calls[expr.name] = list(result.tool_calls)
                self._meta[expr.name] = {
                    **result.meta_info,
                    "tool_calls": [c._asdict() for c in result.tool_calls],
                }

    def _select(self, expr: Select) -> None:
        conditional = self.backend.choice_logprobs(self._text, expr.choices, tuple(self._images))
        unconditional = None
        if expr.method.needs_unconditional:
            context = self.role_format().prefix.get(self._role or "", "") or "\n"
            unconditional = self.backend.choice_logprobs(context, expr.choices)
        decision = expr.method.decide(conditional, unconditional)
        choice = expr.choices[decision.index]
        self._append(choice, expr.name)
        if expr.name is not None:
            self._vars[expr.name] = choice
            self._meta[expr.name] = decision_meta(expr.choices, decision, conditional)

    # --- roles as context managers ------------------------------------------------------------------------------
    @contextmanager
    def _turn(self, role: str) -> Iterator[None]:
        self += RoleBegin(role)
        yield
        self += RoleEnd(role)

    def system(self):
        """``with s.system(): s += "..."``"""
        return self._turn("system")

    def user(self):
        """``with s.user(): s += "..."``"""
        return self._turn("user")

    def assistant(self):
        """``with s.assistant(): s += gen("answer")``"""
        return self._turn("assistant")

    # --- reading -------------------------------------------------------------------------------------------------
    def sync(self) -> ProgramState:
        """Wait for every append so far; raise the first error."""
        self._worker.wait()
        if self._error is not None:
            raise self._error
        return self

    def __getitem__(self, name: str) -> Any:
        self.sync()
        if name not in self._vars:
            raise KeyError(f"no variable {name!r} (variables: {sorted(self._vars)})")
        return self._vars[name]

    def get_var(self, name: str, default: Any = None) -> Any:
        self.sync()
        return self._vars.get(name, default)

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """A variable's meta info: token counts (``cached_tokens`` …) for ``gen``, scores for ``select``."""
        self.sync()
        return self._meta[name]

    def tool_calls(self, name: str) -> list[ToolCall]:
        """The calls a ``gen(name, tools=...)`` made (``ToolCall(name, arguments)``, arguments as JSON text); []
        when it made none or had no tools. The calls stay out of the text and the messages (a follow-up turn sees
        the content only): send their results back as a turn of your own."""
        self.sync()
        if name not in self._vars:
            raise KeyError(f"no variable {name!r} (variables: {sorted(self._vars)})")
        return list(self._calls.get(name, []))

    def variables(self) -> dict[str, Any]:
        self.sync()
        return dict(self._vars)

    def text(self) -> str:
        """The whole text so far (role prefixes and suffixes included)."""
        return self.sync()._text

    def messages(self) -> list[dict[str, Any]]:
        """The finished turns as chat messages; a turn with images has OpenAI's content parts (``text`` and
        ``image_url``, with ``data:`` URLs)."""
        self.sync()
        if not self._images:
            return list(self._messages)
        return chat_messages(self._messages, self._images, self.backend.image_token(), strict=False)

    def error(self) -> BaseException | None:
        """The error that stopped this state, if any (waits for pending appends)."""
        self._worker.wait()
        self._program_done.wait()
        return self._error

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """Text deltas as they are produced (``run(..., stream=True)``); only ``var_name``'s when given. Without
        streaming, yields the whole text (or the variable) once."""
        if self._stream is None:
            yield self.text() if var_name is None else self[var_name]
            return
        while (item := self._stream.get()) is not _END:
            var, delta = item
            if var_name is None or var == var_name:
                yield delta
        self._stream.put(_END)  # a second text_iter() ends at once instead of waiting forever
        if self._error is not None:
            raise self._error

    # --- forks ---------------------------------------------------------------------------------------------------
    def fork(self, n: int = 1) -> ForkGroup:
        """``n`` states that continue from this one's text; the prefix is cached on the server first, so the
        branches reuse its KV. Join them with ``forks.join()``."""
        if not isinstance(n, int) or n < 1:
            raise InvalidRequestError(f"fork needs n >= 1, got {n!r}")
        self.sync()
        self.backend.cache_prefix(self._text, tuple(self._images))
        children = []
        for _ in range(n):
            child = ProgramState(self.backend, self.defaults)
            child._format, child._text, child._messages = self._format, self._text, list(self._messages)
            child._images = list(self._images)
            child._role, child._role_start, child._roles_seen = self._role, self._role_start, self._roles_seen
            child._vars, child._meta, child._calls = dict(self._vars), dict(self._meta), dict(self._calls)
            children.append(child)
        self._children += children
        return ForkGroup(self, children)

    # --- lifetime ------------------------------------------------------------------------------------------------
    def _finish(self, error: BaseException | None = None) -> None:
        """End of the program: record its error, stop the worker threads, end the stream."""
        if error is not None and self._error is None:
            self._error = error
        self._close_workers()
        self._program_done.set()
        if self._stream is not None:
            self._stream.put(_END)

    def _close_workers(self) -> None:
        for child in self._children:  # forks of forks too
            child._close_workers()
        self._worker.close()

    def __repr__(self) -> str:
        return f"ProgramState(text={self._text[-60:]!r}, variables={sorted(self._vars)})"


class ForkGroup:
    """The branches of ``s.fork(n)``: index or iterate them; ``forks += expr`` appends to each (or a list of
    expressions, one per branch); ``join()`` waits for all of them and gathers their new variables into the
    parent as lists (``s["idea"] == [branch0["idea"], …]``)."""

    def __init__(self, parent: ProgramState, states: list[ProgramState]) -> None:
        self.parent, self.states = parent, states
        self._base_vars = dict(parent._vars)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ForkGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise InvalidRequestError(f"{len(other)} expressions for {len(self.states)} forks")
            for st, expr in zip(self.states, other, strict=True):
                st += expr
        else:
            for st in self.states:
                st += other
        return self

    def join(self) -> list[ProgramState]:
        """Wait for every branch (raising the first error) and gather their new variables into the parent."""
        for st in self.states:
            st.sync()
        names = {
            k for st in self.states for k, v in st._vars.items() if self._base_vars.get(k, _END) is not v
        }
        for name in sorted(names):
            self.parent._vars[name] = [st._vars.get(name) for st in self.states]
        return self.states
