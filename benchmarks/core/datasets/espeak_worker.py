"""eSpeak NG in a small worker process, each request answered from a fresh fork.

eSpeak keeps state from one utterance to the next (pitch flutter, filter memories, libc's
random generator), so the same word said twice gives different samples. This worker loads the
library once and speaks nothing itself; every request is handled by a fork of it, with eSpeak's
and libc's generators seeded, so an answer depends on the request alone. It is run as a script
(``python -I espeak_worker.py LIBRARY DATA``) and imports only the standard library, so its
forks are cheap whatever the calling process has loaded (POSIX only).

Protocol: the worker first writes the sample rate as a little-endian int32. Then, per request
line of JSON (``{"op": "speak", "voice": "en-us+m3", "rate": 175, "text": "word"}`` or
``{"op": "phonemes", "voice": "en-us", "text": "word"}``), it writes an int32 length and that
many bytes: int16 samples or UTF-8 phonemes. A length of -1 means the request failed (the
reason goes to stderr).
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import traceback
from typing import Any, Callable

# speak_lib.h
SYNCHRONOUS = 2
CHARS_UTF8 = 1
POSITION_CHARACTER = 1
RATE = 1
PHONEMES_ASCII = 0
CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)
FAILED = -1


class Speaker:
    """The loaded library and the handlers of the two requests."""

    def __init__(self, library: str, data: str) -> None:
        self.lib = ctypes.CDLL(library)
        self.libc = ctypes.CDLL(None)
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.sample_rate = self.lib.espeak_Initialize(SYNCHRONOUS, 0, data.encode(), 0)
        self.chunks: list[bytes] = []
        self.callback = CALLBACK(self._collect)  # kept alive: eSpeak holds the pointer
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, samples: Any, count: int, events: Any) -> int:
        if count > 0:
            self.chunks.append(ctypes.string_at(samples, 2 * count))
        return 0

    def handle(self, request: dict[str, Any]) -> bytes:
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(1))
        self.libc.srand(1)
        if self.lib.espeak_SetVoiceByName(request["voice"].encode()) != 0:
            raise ValueError(f"no eSpeak voice {request['voice']!r}")
        text = request["text"].encode()
        if request["op"] == "phonemes":
            pointer = ctypes.c_char_p(text)
            return self.lib.espeak_TextToPhonemes(
                ctypes.byref(pointer), CHARS_UTF8, PHONEMES_ASCII
            ).strip()
        self.lib.espeak_SetParameter(RATE, request["rate"], 0)
        terminated = text + b"\0"
        status = self.lib.espeak_Synth(
            terminated, len(terminated), 0, POSITION_CHARACTER, 0, CHARS_UTF8, None, None
        )
        if status != 0:
            raise RuntimeError(f"espeak_Synth returned {status}")
        return b"".join(self.chunks)


def in_fresh_fork(answer: Callable[[], bytes]) -> bytes | None:
    """``answer()`` computed in a child process; None if it failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                out.write(answer())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as stream:
        data = stream.read()
    _, status = os.waitpid(pid, 0)
    return data if status == 0 else None


def serve(library: str, data: str) -> None:
    speaker = Speaker(library, data)
    out = sys.stdout.buffer
    out.write(struct.pack("<i", speaker.sample_rate))
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        reply = in_fresh_fork(lambda: speaker.handle(request))  # noqa: B023 (called at once)
        out.write(struct.pack("<i", FAILED if reply is None else len(reply)) + (reply or b""))
        out.flush()


if __name__ == "__main__":
    serve(*sys.argv[1:3])
