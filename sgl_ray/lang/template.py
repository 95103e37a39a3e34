"""Role prefixes and suffixes of a model's chat template, for programs that write a conversation as text.

A program's prompt is plain text; ``system()/user()/assistant()`` wrap their content in the role's prefix and
suffix. :func:`role_format_from_tokenizer` reads those strings out of the tokenizer's own (Jinja) chat template by
rendering short conversations with sentinel contents, so a program renders a conversation exactly as
``/v1/chat/completions`` would (the template's default system prompt included, when the program gives none).

Invariant (checked in tests): for messages ``[system?, user, assistant, ...]``, the program's text
``begin + default_system (if no system) + Σ prefix[role] + content + suffix[role]`` followed by
``prefix["assistant"]`` equals ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``,
less a leading BOS the tokenizer adds by itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

ROLES = ("system", "user", "assistant")
_SENTINELS = {"system": "\x00SYS\x00", "user": "\x00USR\x00", "assistant": "\x00AST\x00"}


@dataclass(frozen=True)
class RoleFormat:
    """How each role's turn is written: ``prefix[role] + content + suffix[role]``.

    ``begin`` is what the template writes once before the first turn (a BOS token the tokenizer does not add by
    itself); ``default_system`` the whole system turn it inserts when a conversation has none ("" if none);
    ``image_token`` what stands for one image in the prompt (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``;
    None: the model takes no images).
    Example::

        >>> f = RoleFormat.plain()
        >>> f.prefix["user"] + "Hi" + f.suffix["user"]
        'User: Hi\\n'
    """

    prefix: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, str] = field(default_factory=dict)
    default_system: str = ""
    begin: str = ""
    name: str = "custom"
    image_token: str | None = None

    @classmethod
    def plain(cls) -> RoleFormat:
        """A template-less format for base models: ``System: …\\nUser: …\\nAssistant: …\\n``."""
        return cls(
            prefix={r: f"{r.capitalize()}: " for r in ROLES},
            suffix={r: "\n" for r in ROLES},
            name="plain",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoleFormat:
        return cls(
            prefix=dict(d["prefix"]),
            suffix=dict(d["suffix"]),
            default_system=str(d.get("default_system", "")),
            begin=str(d.get("begin", "")),
            name=str(d.get("name", "custom")),
            image_token=d.get("image_token"),
        )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("a")
    return bool(ids) and ids[0] == bos


def role_format_from_tokenizer(tokenizer: Any, hf_config: Any = None) -> RoleFormat:
    """The :class:`RoleFormat` of ``tokenizer``'s chat template (``RoleFormat.plain()`` when it has none); with
    the model's ``hf_config``, the image placeholder of a vision-language model as ``image_token``.

    Each role's prefix is what the template writes between the previous turn and the role's content; its suffix
    what follows the content up to the next turn. Templates that cannot render a role in this position (some
    refuse a system turn) leave it with an empty prefix and suffix.
    """
    image_token = _image_token(hf_config)
    if not getattr(tokenizer, "chat_template", None):
        return replace(RoleFormat.plain(), image_token=image_token)
    s, u, a = _SENTINELS["system"], _SENTINELS["user"], _SENTINELS["assistant"]
    sys_msg, user_msg, ast_msg = (
        {"role": "system", "content": s},
        {"role": "user", "content": u},
        {"role": "assistant", "content": a},
    )
    r = lambda msgs, gen=False: _render(tokenizer, msgs, gen)  # noqa: E731
    suffix = {
        "user": r([user_msg]).split(u, 1)[1],  # a conversation's last turn ends with exactly its suffix
        "assistant": r([user_msg, ast_msg]).split(a, 1)[1],
    }
    prefix = {
        "assistant": _strip_start(r([user_msg], True).split(u, 1)[1], suffix["user"]),
        "user": _strip_start(
            r([user_msg, ast_msg, {"role": "user", "content": u + "2"}]).split(a, 1)[1].split(u + "2", 1)[0],
            suffix["assistant"],
        ),
    }
    first_user = r([user_msg]).split(u, 1)[0]  # default system turn (if any) + the user prefix
    default_system = first_user[: -len(prefix["user"])] if first_user.endswith(prefix["user"]) else first_user
    try:
        prefix["system"], rest = r([sys_msg, user_msg]).split(s, 1)
        suffix["system"] = rest.split(u, 1)[0][: -len(prefix["user"]) or None]
    except Exception:  # the template has no system role
        prefix["system"], suffix["system"] = "", ""
    # A BOS the template writes before the first turn (and that is not itself the start of every turn, as
    # ChatML's <|im_start|> is) belongs to the conversation, not to the system turn.
    bos = getattr(tokenizer, "bos_token", None) or ""
    begin = ""
    if bos and first_user.startswith(bos) and not prefix["user"].startswith(bos):
        begin = bos
        default_system = _strip_start(default_system, bos) if default_system else ""
        prefix["system"] = _strip_start(prefix["system"], bos)
    if begin and _adds_bos(tokenizer):  # the tokenizer adds BOS itself: the text must not carry a second one
        begin = ""
    return RoleFormat(prefix, suffix, default_system, begin, name="chat_template", image_token=image_token)


def _image_token(hf_config: Any) -> str | None:
    """The image placeholder of a vision-language model's architecture (None for a text model)."""
    if hf_config is None:
        return None
    from sgl_ray.multimodal.chat import PLACEHOLDERS
    from sgl_ray.multimodal.config import is_multimodal_config

    if not is_multimodal_config(hf_config):
        return None
    return PLACEHOLDERS.get((getattr(hf_config, "architectures", None) or ["?"])[0])


def _strip_start(text: str, head: str) -> str:
    return text[len(head) :] if head and text.startswith(head) else text
