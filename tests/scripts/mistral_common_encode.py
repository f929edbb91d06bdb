"""Run by tests/test_mistral_common.py in a subprocess whose PYTHONPATH holds mistral-common's
wheels (pypi_files.mistral_common_site), so the test process never imports it: Mistral's own
encoding of chat conversations, the reference prepare is compared with.

    PYTHONPATH=SITE python tests/scripts/mistral_common_encode.py < job.json > out.json

job.json: {"model": a SentencePiece .model.vN file, "conversations": [{"messages": [...],
"tools": [...] or null}, ...]} in the OpenAI form (read by ChatCompletionRequest.from_openai).
out.json: {"instruct_tokenizer": "InstructTokenizerV3", "template": mistral-common's own chat template for the model,
"encodings": [{"tokens": the conversation's ids (encode_chat_completion), "turns": each assistant
message's ids, in order, as the encoder writes it into those tokens}, ...]}.

ValidationMode.finetuning: a conversation ends with an assistant turn, as a training example does.
"""

import json
import sys

from mistral_common.integrations.chat_templates.chat_templates import (
    convert_tokenizer_to_chat_template,
)
from mistral_common.protocol.instruct.messages import AssistantMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer


def encode(tokenizer: MistralTokenizer, conversation: dict) -> dict:
    request = ChatCompletionRequest.from_openai(
        conversation["messages"], tools=conversation.get("tools")
    )
    tokens = tokenizer.encode_chat_completion(request).tokens
    # the assistant messages as encode_chat_completion hands them to the instruct tokenizer
    # (validated, then normalized), each encoded by that tokenizer's own method
    validated = tokenizer._chat_completion_request_validator.validate_request(request)
    normalized = tokenizer._instruct_request_normalizer.from_chat_completion_request(validated)
    turns = [
        tokenizer.instruct_tokenizer.encode_assistant_message(m, is_before_last_user_message=False)
        for m in normalized.messages
        if isinstance(m, AssistantMessage)
    ]
    return {"tokens": tokens, "turns": turns}


def main() -> None:
    job = json.load(sys.stdin)
    tokenizer = MistralTokenizer.from_file(job["model"], mode=ValidationMode.finetuning)
    out = {
        "instruct_tokenizer": type(tokenizer.instruct_tokenizer).__name__,
        "template": convert_tokenizer_to_chat_template(job["model"]),
        "encodings": [encode(tokenizer, c) for c in job["conversations"]],
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
