"""OpenAI response objects for completions and chat completions: whole responses, SSE chunks, usage
and log-probabilities, from the engine's requests and events."""

from __future__ import annotations

import time
import uuid

from hotlora.server.engine.requests import FinishReason

# the completed finish reasons -> OpenAI's; any other ending is an error raised before rendering
FINISH_REASON = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


class Renderer:
    def __init__(self, tokenizer, kind: str, model: str, n: int):
        self.tokenizer = tokenizer
        self.chat = kind == "chat.completion"
        self.kind = kind
        self.model = model
        self.n = n
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}  # completions' text_offset per choice

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- whole responses --------------------------------------------------------------------------------
    def response(self, samples, echo=None) -> dict:
        choices = []
        for index, req in enumerate(samples.requests):
            reason = FINISH_REASON.get(req.finish_reason, req.finish_reason)
            entries = req.output_logprobs if req.params.logprobs is not None else None
            if self.chat:
                choice = {
                    "index": index,
                    "message": {"role": "assistant", "content": req.text},
                    "logprobs": self._chat_logprobs(entries),
                    "finish_reason": reason,
                }
            else:
                prefix = echo[index // samples.n] if echo else ""
                logprobs = self._completion_logprobs(index, entries, len(prefix))
                if prefix and logprobs is not None:
                    logprobs = self._with_prompt(req, logprobs)
                choice = {
                    "index": index,
                    "text": prefix + req.text,
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }
            if req.params.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(req)
            choices.append(choice)
        return {**self._head(self.kind), "choices": choices, "usage": self.usage(samples)}

    @staticmethod
    def usage(samples) -> dict:
        prompt = sum(len(r.prompt_ids) for r in samples.prompt_requests())  # each prompt once, whatever n
        completion = sum(len(r.output_ids) for r in samples.requests if r is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- streaming --------------------------------------------------------------------------------------
    def started(self, choice: int) -> bool:
        return choice in self._started

    def chunks(self, choice: int, event, prefix: str = ""):
        """The SSE chunk objects for one engine event of one choice (none for an empty middle event)."""
        first = choice not in self._started
        self._started.add(choice)
        reason = FINISH_REASON.get(event.finish_reason) if event.finish_reason else None
        text = prefix + event.text
        if not (first or text or event.logprobs or reason):
            return
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            body = {"index": choice, "delta": delta, "logprobs": self._chat_logprobs(event.logprobs)}
            obj = "chat.completion.chunk"
        else:
            offset = self._offsets.get(choice, len(prefix))
            body = {
                "index": choice,
                "text": text,
                "logprobs": self._completion_logprobs(choice, event.logprobs, offset),
            }
            obj = "text_completion"
        body["finish_reason"] = reason
        yield {**self._head(obj), "choices": [body]}

    def usage_chunk(self, samples) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(samples)}

    # ---- log-probabilities ------------------------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, entries):
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                for e in entries
            ]
        }

    def _vllm_prompt_logprobs(self, req) -> list:
        """vLLM's shape: None for the first prompt token, then {token id: {logprob, rank, decoded_token}}
        with the prompt's own token and the top k."""
        out: list = [None]
        for e in req.prompt_logprobs:
            item = {
                str(t): {"logprob": lp, "rank": r + 1, "decoded_token": self._token(t)}
                for r, (t, lp) in enumerate(e.top)
            }
            item[str(e.token_id)] = {
                "logprob": e.logprob,
                "rank": e.rank,
                "decoded_token": self._token(e.token_id),
            }
            out.append(item)
        return out

    def _with_prompt(self, req, logprobs: dict) -> dict:
        """The legacy echo + logprobs: the prompt's tokens first (the first one unscored)."""
        ids = req.prompt_ids
        tokens = [self._token(t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        scored = req.prompt_logprobs
        return {
            "tokens": tokens + logprobs["tokens"],
            "token_logprobs": [None] + [e.logprob for e in scored] + logprobs["token_logprobs"],
            "top_logprobs": [None]
            + [{self._token(t): lp for t, lp in e.top} for e in scored]
            + logprobs["top_logprobs"],
            "text_offset": offsets + logprobs["text_offset"],
        }

    def _completion_logprobs(self, choice: int, entries, offset: int):
        if entries is None:
            return None
        tokens, offsets = [], []
        pos = self._offsets.get(choice, offset)
        for e in entries:
            token = self._token(e.token_id)
            tokens.append(token)
            offsets.append(pos)
            pos += len(token)
        self._offsets[choice] = pos
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._token(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }


def model_card(model_id: str, created: int, parent: str | None, view=None) -> dict:
    """One entry of GET /v1/models; adapters name the base model as their parent. An adapter version's
    (`view`, an AdapterView) says where this replica holds it (hotlora's extension, docs/http.md)."""
    card = {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "hotlora",
        "root": model_id if parent is None else parent,
        "parent": parent,
    }
    if view is not None:
        card["placement"] = {
            "state": view.state.lower(),  # device | host | stored
            "pinned": view.pinned,
            "device": view.device or None,
            "replica": view.replica,
        }
    return card
