"""``POST /v1/embeddings``: one input or a batch in, one vector per input out (float or
base64 of little-endian float32, as OpenAI encodes them)."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass

from gateway.errors import EngineError
from gateway.flow.contract import Result, Stateless, StreamEncoder
from gateway.types import ClientRequest, Endpoint
from gateway.wire.convert import embeddings_request
from gateway.wire.responses import dumps


def encode_vector(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    if encoding == "float":
        return list(vector)
    packed = struct.pack(f"<{len(vector)}f", *vector)  # little-endian float32, whatever the host
    return base64.b64encode(packed).decode("ascii")


@dataclass(frozen=True)
class EmbeddingsEndpoint(Stateless):
    name: Endpoint = "embeddings"
    path: str = "/v1/embeddings"
    id_prefix: str = "embd-"

    def parse(self, body: bytes, request_id: str) -> ClientRequest:
        return embeddings_request(body, request_id)

    def stream_encoder(
        self, request: ClientRequest, response_id: str, created: int
    ) -> StreamEncoder:
        raise TypeError("embeddings are never streamed")

    async def body(
        self, request: ClientRequest, response_id: str, created: int, result: Result
    ) -> bytes:
        data = []
        for g in request.generations:
            vector = result.choice(g.index).embedding
            if vector is None:
                raise EngineError(f"the backend returned no embedding for input {g.index}")
            data.append(
                {
                    "object": "embedding",
                    "index": g.index,
                    "embedding": encode_vector(vector, request.encoding_format),
                }
            )
        usage = result.usage
        body = {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        }
        return dumps(body).encode()
