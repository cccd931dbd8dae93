"""Builds the real Mistral tekken tokenizer files (v15, reasoning settings) for tiny checkpoints.

The vocabulary comes from the tekken file shipped inside mistral-common (Apache-2.0); special
token ids follow the real checkpoint (§4.1 of the format reference).
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

SPECIAL_NAMES = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]", 7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]",
    10: "[IMG]", 11: "<pad>", 12: "[IMG_BREAK]", 13: "[IMG_END]", 14: "[PREFIX]",
    15: "[MIDDLE]", 16: "[SUFFIX]", 17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]",
    19: "[TOOL_CONTENT]", 32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]",
    36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]",
}
NUM_SPECIAL = 1000


def tekken_v15() -> dict:
    src = importlib.resources.files("mistral_common") / "data" / "tekken_240911.json"
    data = json.loads(src.read_text(encoding="utf-8"))
    data["config"]["version"] = "v15"
    data["special_tokens"] = [
        {"rank": i, "token_str": SPECIAL_NAMES.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(NUM_SPECIAL)
    ]
    data["image"] = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
    data["model_settings_builder"] = {
        "reasoning_effort": {"type": "enum", "accepts_none": True, "default": "none",
                             "values": ["none", "high"]}
    }
    return data


def chat_template() -> str:
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    return generate_chat_template(
        spm=False, tokenizer_version=TokenizerVersion.v15, image_support=True,
        audio_support=False, thinking_support=True, default_system_prompt=None,
        plain_thinking_support=False, use_special_token_variables=False,
        model_settings_fields=frozenset({"reasoning_effort"}),
        reasoning_effort_values=("none", "high"), reasoning_effort_default="none",
    )


def write_tokenizer_files(out: Path) -> None:
    """Write tekken.json, tokenizer.json, tokenizer_config.json and chat_template.jinja."""
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    tekken = out / "tekken.json"
    tekken.write_text(json.dumps(tekken_v15()), encoding="utf-8")
    template = chat_template()
    tokenizer = convert_tekken_tokenizer(str(tekken), chat_template=template)
    tokenizer.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
