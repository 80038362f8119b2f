"""The model server: runs inside the scoring sandbox, loads a saved model and answers token batches.

    python -P -B -m evaluator.model_server --model PATH --submission DIR --device cpu|cuda:0 --threads N

This is the only place a saved model is ever unpickled. It imports nothing from the host side of
the evaluator (stdlib and torch only): everything it sends back is checked by `evaluator.scoring`,
which trusts none of it.

Protocol (stdin/stdout of this process; stdout is moved to stderr before the model is loaded, so
a `print` in model code lands in the log, not in the protocol):

Request (host -> server), binary, repeated until EOF:
    8 bytes header: struct "<II" = batch size B, length T (both >= 1)
    B*T token ids, int64 little-endian, row-major (the host and the server share one machine)

Reply (server -> host): one JSON line (UTF-8, "\\n"-terminated), optionally followed by a payload:
    {"event": "ready", "torch": "2.x", "device": "cpu"}            once, after the model has loaded
    {"event": "logits", "shape": [B, T, V], "dtype": "float32", "nbytes": N}
        followed by exactly N bytes: the logits, C-contiguous, in the machine's byte order
    {"event": "error", "stage": "load" | "forward", "message": "the exception's last line"}

After a load error the server exits 1; after a forward error it keeps serving (the host decides).
EOF on stdin at a request boundary exits 0. The dtype is whatever the model returned, named as in
torch without the "torch." prefix; the host accepts only float16, bfloat16, float32 and float64.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import sys
import traceback

import torch

REQUEST_HEADER = struct.Struct("<II")
TOKEN_BYTES = 8
MESSAGE_CAP_CHARS = 2000


class _Protocol:
    """The private stdin/stdout of the server; fds 0 and 1 are pointed elsewhere for model code."""

    def __init__(self) -> None:
        self._requests = os.fdopen(os.dup(0), "rb")
        self._replies = os.fdopen(os.dup(1), "wb")
        # Model code that reads stdin gets EOF; model code that prints writes to the log.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def read_request(self):
        """Returns (B, T, token bytes), or None on EOF at a request boundary."""
        header = self._requests.read(REQUEST_HEADER.size)
        if not header:
            return None
        if len(header) != REQUEST_HEADER.size:
            raise EOFError("stdin ended inside a request header")
        batch, length = REQUEST_HEADER.unpack(header)
        if batch < 1 or length < 1:
            raise ValueError(f"malformed request: B={batch}, T={length}")
        payload = self._requests.read(batch * length * TOKEN_BYTES)
        if len(payload) != batch * length * TOKEN_BYTES:
            raise EOFError("stdin ended inside a request's token ids")
        return batch, length, payload

    def send(self, header: dict, payload=None) -> None:
        self._replies.write(json.dumps(header).encode() + b"\n")
        if payload is not None:
            self._replies.write(payload)
        self._replies.flush()

    def send_error(self, stage: str, exc: BaseException) -> None:
        traceback.print_exception(exc, file=sys.stderr)
        last_line = traceback.format_exception_only(exc)[-1].strip()
        self.send({"event": "error", "stage": stage, "message": last_line[:MESSAGE_CAP_CHARS]})


def _load_model(model_path: str, device: str):
    model = torch.load(model_path, map_location=device, weights_only=False)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"the saved object is a {type(model).__name__}, not a torch.nn.Module")
    model.eval()
    return model


def _as_logits(output):
    """The model's output as a dense, contiguous CPU tensor; refuses what cannot be sent raw."""
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"forward returned a {type(output).__name__}, expected a tensor of logits")
    if output.layout != torch.strided:
        raise TypeError(f"forward returned a tensor with layout {output.layout}, expected a dense tensor")
    return output.detach().to("cpu").contiguous()


def _send_logits(protocol: _Protocol, logits) -> None:
    nbytes = logits.numel() * logits.element_size()
    header = {
        "event": "logits",
        "shape": list(logits.shape),
        "dtype": str(logits.dtype).removeprefix("torch."),
        "nbytes": nbytes,
    }
    # A view of the tensor's memory, not a copy: logits can be hundreds of MB. `logits` outlives it.
    payload = (ctypes.c_char * nbytes).from_address(logits.data_ptr()) if nbytes else None
    protocol.send(header, payload)


def serve(model_path: str, submission_dir: str, device: str, threads: int) -> int:
    protocol = _Protocol()
    torch.set_num_threads(threads)
    # After our own imports, so a submission file named like a stdlib or torch module cannot
    # replace them; first, so pickled classes resolve to the submission's modules as in training.
    sys.path.insert(0, submission_dir)
    try:
        model = _load_model(model_path, device)
    except BaseException as exc:  # anything the unpickled code raises, SystemExit included
        protocol.send_error("load", exc)
        return 1
    protocol.send({"event": "ready", "torch": torch.__version__, "device": device})

    while True:
        request = protocol.read_request()
        if request is None:
            return 0
        batch, length, token_bytes = request
        tokens = torch.frombuffer(bytearray(token_bytes), dtype=torch.int64).view(batch, length)
        try:
            with torch.no_grad():
                output = model(tokens.to(device))
            logits = _as_logits(output)
        except Exception as exc:
            protocol.send_error("forward", exc)
            continue
        _send_logits(protocol, logits)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluator.model_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the saved model (torch.save of the whole module)")
    parser.add_argument("--submission", required=True, help="the submission folder, put on sys.path")
    parser.add_argument("--device", required=True, help="cpu or cuda:0")
    parser.add_argument("--threads", type=int, required=True, help="torch intra-op threads")
    args = parser.parse_args(argv)
    return serve(args.model, args.submission, args.device, args.threads)


if __name__ == "__main__":
    sys.exit(main())
