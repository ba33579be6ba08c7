#!/usr/bin/env python3
"""The demo model's training data: Noto emoji images (Apache-2.0) with captions, from the npm
package emoji-datasource-google 16.0.0 (pinned by version and checksum).

Run at build-the-demo time only (never by atelier itself); needs `npm` (for `npm pack`) and
Python's standard library.

    python3 scripts/demo/emoji_dataset.py OUT_DIR

writes
    OUT_DIR/train/<code>.png + <code>.txt   every top-level emoji (skin-tone variants aside),
                                            its captions one per line: the lower-cased name,
                                            then with the short names, then with the category
                                            words too (the trainer draws one per step)
    OUT_DIR/holdout/<code>.png              skin-tone variants (the VAE's hold-out set: images
                                            the transformer never learns)
    OUT_DIR/names.tsv                       code <TAB> name of every training emoji
    OUT_DIR/SOURCE.txt                      package, version, checksum, licences
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
# sha1 of the npm tarball (`npm view emoji-datasource-google@16.0.0 dist.shasum`).
SHASUM = "a80ac3e8106cbd4d8648ce758aa099e8827b6157"
IMAGES = "package/img/google/64/"
# Everyday names for emoji whose emoji.json name is an old Unicode 1.0 one (CLDR's short name);
# each becomes one more caption of its emoji.
ALIASES = {"2764-fe0f": "red heart"}
# Hold-out images for the VAE: one skin-tone variant of this many emoji.
HOLDOUT = 200


def fetch(cache):
    """The package tarball, downloaded once into `cache` and checked."""
    tgz = os.path.join(cache, f"{PACKAGE}-{VERSION}.tgz")
    if not os.path.exists(tgz):
        os.makedirs(cache, exist_ok=True)
        subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--silent"], cwd=cache, check=True,
                       stdout=subprocess.DEVNULL)
    with open(tgz, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
    if digest != SHASUM:
        sys.exit(f"{tgz}: sha1 {digest}, expected {SHASUM}: not the pinned package")
    return tgz


def words(text):
    """'Smileys & Emotion' -> 'smileys and emotion'; 'face-smiling' -> 'face smiling'."""
    text = text.lower().replace("&", "and")
    return re.sub(r"[^a-z0-9']+", " ", text).strip()


def captions(e):
    """The emoji's captions, one per line of its .txt (the trainer draws one per step): the
    lower-cased name alone, the name with its short names, and all of them with the category
    words, so a prompt of the plain name meets a caption the model trained on. The plain name
    (and its alias) is written as often as the longer captions together: half the draws, since a
    name is what users type and the frozen random text encoders give a longer caption an
    unrelated encoding, not a nearby one."""
    name = (e.get("name") or e["short_name"]).lower()
    parts = [name]
    for s in e.get("short_names") or []:
        w = words(s)
        if w and w not in parts:
            parts.append(w)
    with_short = len(parts)
    for c in (e.get("category"), e.get("subcategory")):
        w = words(c or "")
        if w and w not in parts:
            parts.append(w)
    alias = ALIASES.get(e["image"][: -len(".png")])
    plain = [name] + ([alias] if alias else [])
    longer = [", ".join(parts[:with_short]), ", ".join(parts)]
    longer = [line for i, line in enumerate(longer) if line not in plain + longer[:i]]
    return plain * max(1, len(longer)) + longer


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "atelier-demo")
    tgz = fetch(cache)
    train = os.path.join(out, "train")
    holdout = os.path.join(out, "holdout")
    for d in (train, holdout):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    with tarfile.open(tgz) as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
        emoji.sort(key=lambda e: e["sort_order"])

        def copy(image, dest):
            data = tar.extractfile(IMAGES + image)
            with open(dest, "wb") as f:
                shutil.copyfileobj(data, f)

        names = []
        variants = []
        for e in emoji:
            if not e.get("has_img_google"):
                continue
            code = e["image"][: -len(".png")]
            copy(e["image"], os.path.join(train, code + ".png"))
            with open(os.path.join(train, code + ".txt"), "w") as f:
                f.write("\n".join(captions(e)) + "\n")
            names.append((code, (e.get("name") or e["short_name"]).lower()))
            for v in (e.get("skin_variations") or {}).values():
                if v.get("has_img_google"):
                    variants.append(v["image"])
                    break  # one variant per emoji: the hold-out spreads over many emoji
        step = max(1, len(variants) // HOLDOUT)
        for image in variants[::step][:HOLDOUT]:
            copy(image, os.path.join(holdout, image))
    with open(os.path.join(out, "names.tsv"), "w") as f:
        for code, name in names:
            f.write(f"{code}\t{name}\n")
    with open(os.path.join(out, "SOURCE.txt"), "w") as f:
        f.write(
            f"npm package {PACKAGE} {VERSION} (sha1 {SHASUM}), {IMAGES}\n"
            "Images: Noto Emoji by Google, Apache License 2.0 (https://github.com/googlefonts/noto-emoji).\n"
            "Names and categories: emoji-datasource (MIT, Cal Henderson), from Unicode CLDR data.\n"
        )
    print(f"{len(names)} training emoji in {train}, {min(HOLDOUT, len(variants))} hold-out images in {holdout}")


if __name__ == "__main__":
    main()
