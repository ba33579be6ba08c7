"""Generates an image through atelier's OpenAI-compatible API with the real `openai` package.

Run by `cargo test --release --test server openai` (tests/server/openai.rs) with
ATELIER_URL and ATELIER_KEY set; exits non-zero on any failure.
"""

import base64
import json
import os
import sys
import urllib.request

import openai

url = os.environ["ATELIER_URL"]
key = os.environ["ATELIER_KEY"]


def usage():
    req = urllib.request.Request(url + "/api/usage", headers={"Authorization": "Bearer " + key})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


client = openai.OpenAI(base_url=url + "/v1", api_key=key)

models = [m.id for m in client.models.list()]
assert "demo-schnell" in models, models

before = usage()["credits_available"]
result = client.images.generate(
    model="demo-schnell",
    prompt="a paper boat on a pond",
    n=2,
    size="512x512",
    response_format="b64_json",
    extra_body={"seed": 1234},
)
assert len(result.data) == 2, result
png = base64.b64decode(result.data[0].b64_json)
assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]
assert b"Seed: 1234" in png, "the PNG keeps its parameters"
after = usage()["credits_available"]
assert after == before - 20, (before, after)

# A URL instead of the bytes; the URL needs the same key.
result = client.images.generate(model="demo-schnell", prompt="a kite", size="512x512", response_format="url")
link = result.data[0].url
req = urllib.request.Request(link, headers={"Authorization": "Bearer " + key})
with urllib.request.urlopen(req) as r:
    assert r.read(8) == b"\x89PNG\r\n\x1a\n"

# Refusals come back as OpenAI errors with atelier's status codes.
try:
    client.images.generate(model="demo-schnell", prompt="x", size="512x500")
    raise SystemExit("a bad size was accepted")
except openai.BadRequestError as e:
    assert "multiples of 16" in str(e), e
try:
    client.images.generate(model="no-such-model", prompt="x", size="512x512")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    client.images.generate(model="demo-schnell", prompt="x", size="512x512", n=40)
    raise SystemExit("a batch over the plan was accepted")
except openai.PermissionDeniedError as e:
    assert "batch" in str(e), e
bad = openai.OpenAI(base_url=url + "/v1", api_key="atk_wrong")
try:
    bad.models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("openai client: ok (balance %d -> %d)" % (before, usage()["credits_available"]))
