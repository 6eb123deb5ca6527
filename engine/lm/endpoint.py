"""A teacher served behind an OpenAI-compatible API, reached from inside the sandbox through the worker's proxy.

The executor has no network. For a job whose spec names ``teacher.endpoint``, the worker (outside the sandbox)
listens on a Unix socket in the job's scratch directory and forwards ``POST /v1/completions`` to the allow-listed
endpoint with the deployment's credentials (``worker/teacher_proxy.py``); the engine reads ``inputs/teacher``, a
JSON file ``{"model", "top_logprobs", "socket"}``, and talks HTTP over that socket. The endpoint's URL and key never
enter the sandbox.

:class:`EndpointTeacher` offers what a causal-LM job needs from a teacher:

* :meth:`complete` - completions of prompts (``generate`` steps, report samples): ``/v1/completions`` with
  ``prompt`` a list of strings, ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``seed``;
* :meth:`score` - for token-id sequences, the served model's top-``k`` log-probabilities at every position and the
  log-probability of the actual token: ``prompt`` as token ids, ``echo: true``, ``logprobs: k``, ``max_tokens: 1``
  (OpenAI's legacy completions format, which vLLM, TGI and llama.cpp's server also answer). Tokens come back as
  strings: vocabulary strings (``Ġthe``), ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``) or decoded text;
  each is mapped to an id of the student's tokenizer, and :meth:`check_tokenizer` refuses the job before any
  training when the served tokenizer splits sample text differently.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
from pathlib import Path
from typing import Any

import torch

from engine.errors import InvalidModel, InvalidSpec
from engine.lm.divergence import LOG_FLOOR, TopK

#: Sequences per scoring request, prompts per completion request.
SCORE_BATCH = 8
COMPLETE_BATCH = 16
MAX_RESPONSE_BYTES = 256 << 20


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("teacher", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class EndpointTeacher:
    """The served teacher described by ``inputs/teacher`` (see the module docstring)."""

    def __init__(self, config_path: Path, tok: Any, timeout: float = 600.0):
        try:
            config = json.loads(Path(config_path).read_text())
            self.model, self.top_logprobs = str(config["model"]), int(config["top_logprobs"])
            self.socket = str(config["socket"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidModel(f"the served teacher's description is unreadable: {exc}") from None
        self.tok, self.timeout = tok, timeout
        self._ids: dict[str, int] | None = None

    # ---- transport -------------------------------------------------------------------------------------------
    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        conn = _UnixHTTPConnection(self.socket, self.timeout)
        try:
            conn.request("POST", "/v1/completions", json.dumps({**body, "model": self.model}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read(MAX_RESPONSE_BYTES + 1)
        except OSError as exc:
            raise InvalidModel(f"the served teacher cannot be reached: {exc}") from None
        finally:
            conn.close()
        if len(raw) > MAX_RESPONSE_BYTES:
            raise InvalidModel("the served teacher's answer is larger than 256 MiB")
        if resp.status != 200:
            raise InvalidModel(f"the served teacher answered HTTP {resp.status}: {raw[:300].decode(errors='replace')}")
        try:
            answer = json.loads(raw)
            choices = answer["choices"]
            assert isinstance(choices, list)
        except (ValueError, KeyError, AssertionError):
            raise InvalidModel("the served teacher's answer is not an OpenAI completions response") from None
        return answer

    # ---- completions -----------------------------------------------------------------------------------------
    def complete(self, prompts: list[str], *, max_tokens: int, temperature: float, top_p: float = 1.0, n: int = 1,
                 seed: int = 0) -> list[str]:
        """``n`` completions per prompt, in order (prompt 0's n, then prompt 1's ...)."""
        out: list[str] = []
        for start in range(0, len(prompts), COMPLETE_BATCH):
            chunk = prompts[start:start + COMPLETE_BATCH]
            answer = self._post({"prompt": chunk, "max_tokens": max_tokens, "temperature": temperature,
                                 "top_p": top_p, "n": n, "seed": seed + start})
            choices = sorted(answer["choices"], key=lambda c: int(c.get("index", 0)))
            if len(choices) != len(chunk) * n:
                raise InvalidModel(f"the served teacher returned {len(choices)} completions for {len(chunk)} prompts "
                                   f"× n={n}")
            out += [str(c.get("text", "")) for c in choices]
        return out

    # ---- scoring ---------------------------------------------------------------------------------------------
    def _token_id(self, token: str) -> int | None:
        if token.startswith("token_id:") and token[9:].isdigit():
            return int(token[9:])
        found = self.tok.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != self.tok.unk_token_id:
            return found
        if self._ids is None:  # decoded text → id, for servers that answer decoded pieces
            self._ids = {}
            for i in range(len(self.tok)):
                self._ids.setdefault(self.tok.decode([i]), i)
        return self._ids.get(token)

    def _score_request(self, rows: list[list[int]] | list[str]) -> list[dict[str, Any]]:
        """Echoed log-probabilities of each row (token ids, or text the server tokenizes), without the one token
        generated after it."""
        answer = self._post({"prompt": rows, "max_tokens": 1, "echo": True, "logprobs": self.top_logprobs,
                             "temperature": 0.0})
        choices = sorted(answer["choices"], key=lambda c: int(c.get("index", 0)))
        if len(choices) != len(rows):
            raise InvalidModel(f"the served teacher scored {len(choices)} of {len(rows)} sequences")
        out = []
        for row, c in zip(rows, choices):
            lp = c.get("logprobs") or {}
            tokens, tops, actual = lp.get("tokens"), lp.get("top_logprobs"), lp.get("token_logprobs")
            if not (isinstance(tokens, list) and isinstance(tops, list) and isinstance(actual, list)) or len(tokens) < 2:
                raise InvalidModel("the served teacher did not echo the sequence's log-probabilities (it must answer "
                                   "'echo' with 'logprobs', as OpenAI's completions API does)")
            n = len(row) if isinstance(row, list) else len(tokens) - 1
            if len(tokens) < n or len(tops) < n:
                raise InvalidModel("the served teacher echoed fewer tokens than it was sent")
            out.append({"tokens": tokens[:n], "top": tops[:n], "actual": actual[:n]})
        return out

    def check_tokenizer(self, texts: list[str]) -> None:
        """Refuse (InvalidSpec) unless the served model splits ``texts`` into the student tokenizer's tokens: the
        texts are sent as text, the server tokenizes them, and its echoed tokens must be the student's."""
        for text in texts[:4]:
            text = text[:400]
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            (scored,) = self._score_request([text])
            theirs = [self._token_id(t) for t in scored["tokens"]]
            if theirs and theirs[0] == self.tok.bos_token_id and ids[0] != self.tok.bos_token_id:
                theirs = theirs[1:]  # the server put a BOS before the text
            if theirs != ids:
                at = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), min(len(theirs), len(ids)))
                served = scored["tokens"][at] if at < len(scored["tokens"]) else "(end)"
                mine = self.tok.convert_ids_to_tokens(ids[at]) if at < len(ids) else "(end)"
                raise InvalidSpec(f"the served teacher's tokenizer differs from the student's: at token {at} of "
                                  f"{text[:40]!r} it has {served!r}, the student {mine!r}; token-level KD needs the "
                                  "same vocabulary (upload a student with the served model's tokenizer, or distill "
                                  "through a generate step only)")

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[TopK, torch.Tensor]:
        """For sequences [B, L]: the teacher's targets for positions 0..L-2 (each predicting the next token) as
        :class:`TopK` [B, L-1, k], and the log-probability of each actual next token [B, L-1] (0 on padding)."""
        b, length = input_ids.shape
        k = self.top_logprobs
        logprobs = torch.full((b, length - 1, k), LOG_FLOOR)
        indices = torch.zeros((b, length - 1, k), dtype=torch.long)
        actual = torch.zeros((b, length - 1))
        for start in range(0, b, SCORE_BATCH):
            rows = [input_ids[i, : int(attention_mask[i].sum())].tolist() for i in range(start, min(b, start + SCORE_BATCH))]
            for offset, scored in enumerate(self._score_request(rows)):
                i = start + offset
                for t in range(1, len(rows[offset])):
                    top = scored["top"][t] or {}
                    pairs = sorted(((lp, self._token_id(tok)) for tok, lp in top.items()), reverse=True)[:k]
                    for j, (lp, tid) in enumerate(pairs):
                        if tid is not None and lp is not None and math.isfinite(lp):
                            logprobs[i, t - 1, j], indices[i, t - 1, j] = float(lp), tid
                    value = scored["actual"][t]
                    actual[i, t - 1] = float(value) if value is not None else LOG_FLOOR
        return TopK(logprobs, indices), actual
