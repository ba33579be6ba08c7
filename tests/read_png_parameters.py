"""Reads an atelier PNG with a third-party parser, the `sd-parsers` package (what image
browsers and prompt readers use for A1111/Forge PNGs), and prints what it found as JSON.

sd-parsers 0.6 splits the settings line on every comma and colon, so a quoted value holding
either (A1111's `Lora hashes: "a: 1, b: 2"`) is dropped by it; that field is read here with
A1111's own pattern for settings (`re_param_code` of modules/infotext_utils.py), which
understands quotes.

usage: read_png_parameters.py IMAGE.png
"""

import json
import re
import sys

from sd_parsers import ParserManager

info = ParserManager().parse(sys.argv[1])
if info is None:
    sys.exit("sd-parsers found no parameters")
sampler = info.samplers[0]
raw = info.raw_parameters["parameters"]
settings = raw.split("\n")[-1]
re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
a1111 = {k: v.strip('"') for k, v in re_param.findall(settings)}
json.dump(
    {
        "generator": info.generator.name,
        "prompt": info.full_prompt,
        "sampler": sampler.name,
        "parameters": sampler.parameters,
        "model": sampler.model.name if sampler.model else None,
        "model_hash": sampler.model.hash if sampler.model else None,
        "metadata": {str(k): v for k, v in info.metadata.items()},
        "lora_hashes": a1111.get("Lora hashes"),
    },
    sys.stdout,
)
