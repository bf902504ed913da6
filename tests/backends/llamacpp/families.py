"""Chat templates of the tool-calling model families, written for the tiny test models.

Each is modelled on its family's published template (the same markers, the same places for
tools, calls and results) and written here, so that a test can state the exact prompt a
conversation renders to and the exact text a forced call is made of.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.backends.llamacpp.tiny_gguf import Vocab

HERMES_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call functions. Their signatures are within <tools></tools>:"
    "\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each call, return a JSON object within <tool_call></tool_call>"
    ' tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.function.name + \'", "arguments": \''
    " + (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' and tools and loop.first %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\nGiven the following functions, respond"
    ' with a JSON for a function call.\\n\\nRespond in the format {"name": function name,'
    ' "parameters": dictionary of argument name and its value}.\\n\\n\' }}'
    "{%- for tool in tools %}{{- (tool | tojson(indent=4)) + '\\n\\n' }}{%- endfor %}"
    "{{- message.content + '<|eot_id|>' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>' }}"
    "{%- for call in message.tool_calls %}"
    "{%- if not loop.first %}{{- '; ' }}{%- endif %}"
    '{{- \'{"name": "\' + call.function.name + \'", "parameters": \''
    " + (call.function.arguments | tojson) + '}' }}"
    "{%- endfor %}"
    "{{- '<|eom_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content"
    " + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

#: Qwen3-style: the generation prompt opens the reasoning unless thinking is turned off.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)

_MISTRAL_HEAD = (
    "{{- bos_token }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- set system = messages[0].content + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}"
    "{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST]' + (system if loop.index0 == ns.last_user else '') + message.content"
    " + '[/INST]' }}"
)

# Mistral v3: the calls as one JSON list after [TOOL_CALLS], results as JSON objects.
MISTRAL_TEMPLATE = (
    _MISTRAL_HEAD + "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '[TOOL_CALLS][' }}"
    "{%- for call in message.tool_calls %}"
    "{%- if not loop.first %}{{- ', ' }}{%- endif %}"
    '{{- \'{"name": "\' + call.function.name + \'", "arguments": \''
    " + (call.function.arguments | tojson) + ', \"id\": \"' + call.id + '\"}' }}"
    "{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- elif message.role == 'tool' %}"
    '{{- \'[TOOL_RESULTS]{"content": \' + (message.content | tojson) + \', "call_id": "\''
    " + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}"
    "{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Mistral's newer templates: [TOOL_CALLS]name[ARGS]{...} per call, results as plain text.
MISTRAL_ARGS_TEMPLATE = (
    _MISTRAL_HEAD + "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{{- '[TOOL_CALLS]' + call.function.name + '[ARGS]' + (call.function.arguments | tojson) }}"
    "{%- endfor %}"
    "{{- eos_token }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}"
    "{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

_MISTRAL_CONTROL = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
)


@dataclass(frozen=True)
class Family:
    """A tool-calling family: its tiny model's vocabulary and what the gateway must find."""

    name: str
    vocab: Vocab
    #: The tool format the gateway must detect from the template.
    tool_format: str
    #: Markers that are single control tokens of the model.
    special_markers: tuple[str, ...]


FAMILIES = (
    Family(
        "hermes",
        Vocab(
            template=HERMES_TEMPLATE,
            user_defined=("<tool_call>", "</tool_call>"),
        ),
        "hermes",
        ("<tool_call>", "</tool_call>"),
    ),
    Family(
        "llama3",
        Vocab(
            template=LLAMA3_TEMPLATE,
            control=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|eom_id|>",
                "<|python_tag|>",
            ),
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            pad="<|end_of_text|>",
        ),
        "llama3",
        ("<|python_tag|>",),
    ),
    Family(
        "mistral",
        Vocab(
            template=MISTRAL_TEMPLATE,
            control=_MISTRAL_CONTROL,
            bos="<s>",
            eos="</s>",
            pad="<unk>",
        ),
        "mistral",
        ("[TOOL_CALLS]",),
    ),
    Family(
        "mistral_args",
        Vocab(
            template=MISTRAL_ARGS_TEMPLATE,
            control=(*_MISTRAL_CONTROL, "[ARGS]"),
            bos="<s>",
            eos="</s>",
            pad="<unk>",
        ),
        "mistral_args",
        ("[TOOL_CALLS]", "[ARGS]"),
    ),
)
