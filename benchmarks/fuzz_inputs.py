"""Fuzzes the input parsers a user's files reach, coverage-guided, a fixed time each (not CI).

    pip install atheris      # 3.0: wheels for CPython 3.11 on Linux x86-64 (libFuzzer inside)
    python benchmarks/fuzz_inputs.py --seconds 120 --out fuzz_results.json

Targets (each gets the fuzzer's bytes as the content of a file, as a user's file would be):
    flickr_xml   sslocal.data.annotations.load_flickr_xml   (SoundNet-Flickr Annotations/*.xml)
    vggss_json   sslocal.data.annotations.load_vggss        (vggss.json)
    split_list   sslocal.data.annotations.read_list         (split and --ids lists)
    audio        sslocal.data.spectrogram.load_clip_audio   (ROOT/audio/*, then the spectrogram)
The only outcomes allowed are a result or the documented errors, ValueError and
FileNotFoundError: anything else (another exception, a hang past --timeout seconds, memory past
--rss_limit_mb) is a crash. libFuzzer stops at the first crash and writes the input to
--artifacts/crash-*; this script reports it with its exception, so that it can be fixed and the
target run again. Each target runs in its own process (libFuzzer ends the process when its time
is up), seeded with valid files written here; sslocal's modules (and, for audio, soundfile's
and librosa's Python code) are instrumented for coverage. The results are in docs/faults.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = ("flickr_xml", "vggss_json", "split_list", "audio")
ALLOWED = (ValueError, FileNotFoundError)
REPO = Path(__file__).resolve().parents[1]


# -- seeds: valid inputs of each kind --------------------------------------------------------

def _seeds(target: str) -> list[bytes]:
    if target == "flickr_xml":
        box = "<bbox><name>x</name><v>10</v><v>20</v><v>100</v><v>200</v></bbox>"
        return [f"<annotation><object>{box}</object></annotation>".encode(),
                f"<annotation><object>{box}{box}</object><size>3</size></annotation>".encode(),
                b"<?xml version='1.0'?><annotation><bbox><a/><b>1</b><c> 2</c><d>3 </d><e>4</e>"
                b"</bbox></annotation>"]
    if target == "vggss_json":
        from sslocal.data import annotations

        shipped = json.loads((annotations.metadata_dir() / "vggss.json").read_text())
        return [json.dumps(shipped[:2]).encode(), json.dumps(shipped[2:3], indent=1).encode(),
                b'[{"file": "a", "bbox": [], "class": "dog"}]',
                b'[{"file": "b", "bbox": [[0.1, 0.2, 0.5, 0.6], [-2.9e16, 0, 1, 1]]}]']
    if target == "split_list":
        from sslocal.data import annotations

        head = (annotations.metadata_dir() / "vggss_test.csv").read_bytes()[:400]
        return [head, b"clip_a\nclip_b\n\n clip_c \n", b'"quoted,id",x\nplain,1\n',
                b"video,audio,label\nv1,a1,non-sounding\n"]
    if target == "audio":
        import scipy.io.wavfile
        import soundfile

        t = np.arange(8000) / 16000
        tone = 0.5 * np.sin(2 * np.pi * 440 * t)
        out = []
        for rate, wave in ((16000, (tone * 32767).astype(np.int16)),
                           (48000, np.stack([tone, tone[::-1]], 1).astype(np.float32)),
                           (8000, (tone[:4000] * 127 + 128).astype(np.uint8))):
            buf = io.BytesIO()
            scipy.io.wavfile.write(buf, rate, wave)
            out.append(buf.getvalue())
        buf = io.BytesIO()
        soundfile.write(buf, tone, 16000, format="FLAC")
        out.append(buf.getvalue())
        return out
    raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")


# libFuzzer dictionaries: the tokens of each format, which random mutations rarely hit.
DICTIONARIES = {
    "flickr_xml": [b"<annotation>", b"</annotation>", b"<object>", b"</object>", b"<bbox>",
                   b"</bbox>", b"<name>", b"</name>", b"<v>", b"</v>", b"<?xml version='1.0'?>",
                   b"<!DOCTYPE a [<!ENTITY e 'x'>]>", b"&e;", b"&#48;", b"<![CDATA[", b"]]>",
                   b"-", b"99999999999999999999", b"9" * 320, b"1_0", b" ", b"\n",
                   b"\xef\xbc\x91"],
    "vggss_json": [b'"file"', b'"bbox"', b'"class"', b"[", b"]", b"{", b"}", b":", b",",
                   b"null", b"true", b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity",
                   b"1e308", b"0.5", b"-2.9e16", b'"\\u0000"', b"[[[[", b"]]]]"],
    "split_list": [b",", b'"', b'""', b"\n", b"\r\n", b"\r", b"\x00", b" ", b"\t",
                   b"video,audio,label", b"non-sounding", b"\xef\xbb\xbf", b"\xff", b"\x0b",
                   b"\xe2\x80\xa8"],
    "audio": [b"RIFF", b"RIFX", b"WAVE", b"fmt ", b"data", b"fact", b"LIST", b"JUNK",
              b"\x01\x00", b"\x03\x00", b"\xfe\xff", b"\x80\xbb\x00\x00", b"\x80\x3e\x00\x00",
              b"\x01\x00\x00\x00", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"fLaC", b"OggS",
              b"ID3", b"\xff\xfb", b"FORM", b"AIFF", b"COMM", b"SSND", b"ftyp"],
}


def _write_dictionary(target: str, path: Path) -> None:
    """libFuzzer's format: one "token" a line; a byte other than printable ASCII, a quote or a
    backslash as \\xNN."""
    def escape(token: bytes) -> str:
        return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}"
                       for b in token)

    path.write_text("".join(f'"{escape(token)}"\n' for token in DICTIONARIES[target]))


# -- one target, inside its own process -------------------------------------------------------

def _one_input(target: str, scratch: Path):
    """The target's function of the fuzzer's bytes (written to a file, as a user's file)."""
    from sslocal.data import annotations, spectrogram

    suffix = {"flickr_xml": ".xml", "vggss_json": ".json", "split_list": ".csv",
              "audio": ".wav"}[target]
    path = scratch / f"input{suffix}"

    def run(data: bytes) -> None:
        path.write_bytes(data)
        try:
            if target == "flickr_xml":
                annotations.load_flickr_xml(path)
            elif target == "vggss_json":
                annotations.load_vggss(path)
            elif target == "split_list":
                annotations.read_list(path)
            else:
                spectrogram.log_spectrogram(spectrogram.load_clip_audio(path))
        except ALLOWED:
            pass

    return run


def _fuzz_in_this_process(target: str, seconds: int, corpus: Path, artifacts: Path,
                          timeout: int, rss_limit_mb: int, max_len: int) -> None:
    import warnings

    import atheris

    warnings.simplefilter("ignore")  # librosa's fallback warnings, on every bad file
    include = ["sslocal"] + (["soundfile", "librosa"] if target == "audio" else [])
    with atheris.instrument_imports(include=include):
        import sslocal.data.annotations  # noqa: F401
        import sslocal.data.spectrogram  # noqa: F401
        import sslocal.data.video  # noqa: F401
    scratch = Path(tempfile.mkdtemp(prefix=f"fuzz_{target}_", dir="/dev/shm"
                                    if os.path.isdir("/dev/shm") else None))
    dictionary = corpus.parent / f"{target}.dict"
    _write_dictionary(target, dictionary)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}",
                   f"-timeout={timeout}", f"-rss_limit_mb={rss_limit_mb}",
                   f"-max_len={max_len}", f"-artifact_prefix={artifacts}/",
                   f"-dict={dictionary}", "-print_final_stats=1"], _one_input(target, scratch))
    atheris.Fuzz()


# -- the driver ----------------------------------------------------------------------------------

def _run_target(target: str, args: argparse.Namespace, folder: Path) -> dict:
    corpus = folder / f"corpus_{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(_seeds(target)):
        (corpus / f"seed_{i}").write_bytes(seed)
    artifacts = Path(args.artifacts).absolute() / target
    artifacts.mkdir(parents=True, exist_ok=True)
    max_len = 65536 if target == "audio" else 8192
    command = [sys.executable, __file__, "--_child", target, "--seconds", str(args.seconds),
               "--_corpus", str(corpus), "--artifacts", str(artifacts),
               "--timeout", str(args.timeout), "--rss_limit_mb", str(args.rss_limit_mb),
               "--_max_len", str(max_len)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=args.seconds + 600)
    wall = time.monotonic() - start
    log = done.stdout + done.stderr
    (Path(args.artifacts) / f"{target}.log").write_text(log)
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    done_line = re.findall(r"Done (\d+) runs in (\d+) second", log)
    executions = int(runs[-1]) if runs else (int(done_line[-1][0]) if done_line else None)
    crashes = sorted(p.name for p in artifacts.iterdir()
                     if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    exception = re.search(r"=== Uncaught Python exception: ===\n(.*?)(?:\n\n|==\d+==)", log, re.S)
    return {"target": target, "seconds": args.seconds, "wall_seconds": round(wall, 1),
            "executions": executions, "crashes": len(crashes), "artifacts": crashes,
            "corpus_files": len(list(corpus.iterdir())), "exit_status": done.returncode,
            "exception": exception.group(1).strip()[-2000:] if exception else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=120, help="fuzzing time per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--artifacts", default="fuzz_artifacts",
                        help="folder for crash inputs and each target's libFuzzer log")
    parser.add_argument("--timeout", type=int, default=20, help="seconds per input: a hang")
    parser.add_argument("--rss_limit_mb", type=int, default=4096)
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_max_len", type=int, default=8192, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        _fuzz_in_this_process(args._child, args.seconds, Path(args._corpus),
                              Path(args.artifacts), args.timeout, args.rss_limit_mb,
                              args._max_len)
        return
    Path(args.artifacts).mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="sslocal_fuzz_") as folder:
        for target in args.targets.split(","):
            result = _run_target(target, args, Path(folder))
            results.append(result)
            print(f"{target}: {result['executions']} executions in {result['seconds']} s, "
                  f"{result['crashes']} crash(es)"
                  + (f": {result['exception'].splitlines()[-1]}" if result["exception"] else ""),
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
