"""What a configured model can do, as ``/v1/models`` lists it for clients (the chat page's
model picker among them).

Nothing is loaded to tell. Before its load a model's capabilities are what its backend
declares from its config (an embedding-only llama.cpp model serves embeddings alone; a remote
fleet serves what its ``capabilities`` list says); once loaded, its backend's
:class:`~gateway.types.BackendInfo` (the context length of the loaded model) and the chat
format the core parses its text with (whether reasoning comes apart from the answer, how tool
calls are written). What only a load can tell is None until then, never a guess.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gateway.backend import Backend, DeclaresModel, chat_format_of
from gateway.types import Capability


@dataclass(frozen=True, slots=True)
class ModelCapabilities:
    """None: not known yet (the model is not loaded, or its backend cannot tell)."""

    #: Chat requests (``/v1/chat/completions``, ``/v1/responses``, ``/v1/messages``).
    chat: bool | None = None
    #: Text completions (``/v1/completions``).
    completions: bool | None = None
    embeddings: bool | None = None
    #: Tool definitions and calls (``tools``).
    tools: bool | None = None
    #: ``response_format`` with a JSON schema (or JSON mode), constrained.
    structured_output: bool | None = None
    #: The model's reasoning is parsed apart from its answer (``reasoning_content``, reasoning
    #: items); False for a model whose chat format has no reasoning markers.
    reasoning: bool | None = None
    #: Image parts in messages.
    vision: bool | None = None
    logprobs: bool | None = None
    #: Tokens one sequence may hold (prompt and output).
    context_length: int | None = None
    #: How the model writes tool calls, which the core parses (``hermes``, ``llama3``,
    #: ``mistral``, ``mistral_args``; ``generic`` where its template knows no tools).
    tool_format: str | None = None

    def as_json(self) -> dict[str, object]:
        return asdict(self)


#: A backend that cannot say anything before it is started.
UNKNOWN = ModelCapabilities()


def model_capabilities(backend: Backend, loaded: bool) -> ModelCapabilities:
    """What the model behind ``backend`` can do; ``loaded``: its backend is started."""
    context: int | None = None
    if loaded:
        info = backend.info
        caps, context = info.capabilities, info.context_length
    elif isinstance(backend, DeclaresModel):
        declared = backend.declared()
        caps, context = declared.capabilities, declared.context_length
    else:
        try:
            caps = backend.info.capabilities
        except RuntimeError:  # its info exists only once started
            return UNKNOWN
    generates = Capability.COMPLETIONS in caps
    # the chat format comes from the loaded model (its template), so only once loaded
    fmt = chat_format_of(backend) if loaded and generates else None
    tools = generates and Capability.TOOLS in caps
    reasoning: bool | None
    if not generates:
        reasoning = False
    elif fmt is not None:
        reasoning = fmt.reasoning is not None
    else:  # not loaded yet, or a remote model whose replicas may send reasoning or not
        reasoning = None
    return ModelCapabilities(
        chat=generates,
        completions=generates,
        embeddings=Capability.EMBEDDINGS in caps,
        tools=tools,
        structured_output=generates and Capability.JSON_SCHEMA in caps,
        reasoning=reasoning,
        vision=generates and Capability.IMAGES in caps,
        logprobs=generates and Capability.LOGPROBS in caps,
        context_length=context,
        tool_format=fmt.tools.name if tools and fmt is not None else None,
    )
