"""A small OpenAI-compatible completions server in front of a transformers causal LM, for the served-teacher tests.

``POST /v1/completions`` answers like OpenAI's (legacy) completions API and vLLM: ``prompt`` as a string, a list of
strings, a list of token ids or a list of such lists; ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``,
``n``, ``seed``; with ``echo`` and ``logprobs: k`` the choice carries ``logprobs`` = ``{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}`` over the prompt's tokens and the generated ones (vocabulary strings; the first
position has no logprobs). ``requests`` records each request's path, headers and body.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class OpenAIServer:
    """``with OpenAIServer(model, tok, api_key="k") as server: server.url`` → ``http://127.0.0.1:<port>/v1``."""

    def __init__(self, model: Any, tok: Any, *, api_key: str | None = None):
        self.model, self.tok, self.api_key = model.eval(), tok, api_key
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if outer.api_key and self.headers.get("Authorization") != f"Bearer {outer.api_key}":
                    return self._send(401, {"error": {"message": "bad key"}})
                if self.path != "/v1/completions":
                    return self._send(404, {"error": {"message": "unknown path"}})
                with outer._lock:  # one model, one request at a time
                    self._send(200, outer.complete(body))

            def _send(self, status: int, answer: dict) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- the completions ---------------------------------------------------------------------------------------
    def _prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = p if isinstance(p, list) else self.tok(p, add_special_tokens=False)["input_ids"]
            bos = [self.tok.bos_token_id] if isinstance(p, str) and self.tok.bos_token_id is not None else []
            out.append(bos + list(ids))
        return out

    def complete(self, body: dict) -> dict:
        import torch

        n, k = int(body.get("n", 1)), body.get("logprobs")
        temperature = float(body.get("temperature", 1.0))
        if body.get("seed") is not None:
            torch.manual_seed(int(body["seed"]))
        choices = []
        for ids in self._prompts(body["prompt"]):
            x = torch.tensor([ids])
            for _ in range(n):
                with torch.no_grad():
                    gen = self.model.generate(
                        input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max(1, int(body["max_tokens"])),
                        do_sample=temperature > 0, pad_token_id=self.tok.pad_token_id, top_k=0,
                        **({"temperature": temperature, "top_p": float(body.get("top_p", 1.0))} if temperature > 0
                           else {}))[0].tolist()
                new = gen[len(ids):]
                choice = {"index": len(choices), "text": self.tok.decode(new, skip_special_tokens=True),
                          "finish_reason": "length", "logprobs": None}
                if body.get("echo") and k:
                    choice["logprobs"] = self._logprobs(ids + new, int(k))
                    choice["text"] = self.tok.decode(ids + new, skip_special_tokens=True)
                choices.append(choice)
        return {"id": "cmpl-test", "object": "text_completion", "model": body.get("model"), "choices": choices}

    def _logprobs(self, ids: list[int], k: int) -> dict:
        import torch

        with torch.no_grad():
            lp = torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        tokens = self.tok.convert_ids_to_tokens(ids)
        top: list[dict | None] = [None]
        actual: list[float | None] = [None]
        for t in range(1, len(ids)):
            values, idx = lp[t - 1].topk(k)
            top.append({self.tok.convert_ids_to_tokens(int(i)): float(v) for v, i in zip(values, idx)})
            actual.append(float(lp[t - 1, ids[t]]))
        return {"tokens": tokens, "token_logprobs": actual, "top_logprobs": top, "text_offset": [0] * len(ids)}
