"""The HTTP API's pure parts: request checks, stop strings, chat templates, the status mapping."""

from __future__ import annotations

import json

import grpc
import pytest

from pdmesh import errors
from pdmesh.router import chat_template
from pdmesh.router.http_server import HTTP_STATUS, error_response
from pdmesh.router.openai_protocol import CHAT, COMPLETION, TO_CONTEXT_END, parse
from pdmesh.router.openai_results import StopMatcher
from pdmesh.router.service import sample_sampling


def completion(**body):
    return parse(COMPLETION, {"model": "m", "prompt": "hi", **body}, "m")


def test_a_completion_maps_onto_generate():
    job = completion(max_tokens=7, temperature=0, top_p=0.5, n=3, stop="\n", seed=9, routed_dp_rank=1,
                     stream=True, stream_options={"include_usage": True}, return_routing=True, user="u")
    s = job.request.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed, job.request.n) == (7, 0.0, 0.5, 9, 3)
    assert job.request.routed_dp_rank == 1 and not job.request.omit_rank_hint
    assert (job.stop, job.stream, job.include_usage, job.return_routing) == (("\n",), True, True, True)
    assert completion(prompt=[1, 2, 3]).request.prompt.token_ids.ids == [1, 2, 3]
    assert completion(prompt=["one"]).request.prompt.text == "one"
    defaults = completion()
    assert defaults.request.sampling.max_new_tokens == 16 and defaults.request.sampling.temperature == 1.0
    assert not defaults.request.HasField("routed_dp_rank")
    assert defaults.request.sampling.seed != completion().request.sampling.seed  # drawn when sampling


def test_chat_defaults_to_the_context_end_and_renders_the_messages():
    job = parse(CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                {"type": "text", "text": "b"}]}]}, "m")
    assert job.request.prompt.text == "User: ab\nAssistant:"
    assert job.request.sampling.max_new_tokens == TO_CONTEXT_END
    job = parse(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                       "max_completion_tokens": 5}, "m")
    assert job.request.sampling.max_new_tokens == 5


@pytest.mark.parametrize("body, param, reason", [
    ({"frequency_penalty": 1}, "frequency_penalty", "UNSUPPORTED_PARAMETER"),
    ({"logprobs": 0}, "logprobs", "UNSUPPORTED_PARAMETER"),
    ({"best_of": 3}, "best_of", "UNSUPPORTED_PARAMETER"),
    ({"mystery": 1}, "mystery", "UNSUPPORTED_PARAMETER"),
    ({"prompt": ["a", "b"]}, "prompt", "UNSUPPORTED_PARAMETER"),
    ({"prompt": ""}, "prompt", "INVALID_PARAMETER"),
    ({"n": 17}, "n", "INVALID_PARAMETER"),
    ({"temperature": 2.5}, "temperature", "INVALID_PARAMETER"),
    ({"top_p": 0}, "top_p", "INVALID_PARAMETER"),
    ({"max_tokens": 0}, "max_tokens", "INVALID_PARAMETER"),
    ({"max_tokens": True}, "max_tokens", "INVALID_PARAMETER"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "INVALID_PARAMETER"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "INVALID_PARAMETER"),
    ({"seed": -1}, "seed", "INVALID_PARAMETER"),
])
def test_what_cannot_be_done_is_refused_by_name(body, param, reason):
    with pytest.raises(errors.InvalidArgument) as err:
        completion(**body)
    assert (err.value.reason, err.value.metadata["param"]) == (reason, param)


def test_neutral_values_of_unsupported_parameters_pass():
    completion(presence_penalty=0, frequency_penalty=0.0, logprobs=None, echo=False, best_of=1, logit_bias={})


def test_model_must_be_the_served_one():
    with pytest.raises(errors.NotFound) as err:
        parse(COMPLETION, {"model": "other", "prompt": "x"}, "m")
    assert err.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(errors.InvalidArgument):
        parse(COMPLETION, {"prompt": "x"}, "m")
    with pytest.raises(errors.InvalidArgument):
        parse(CHAT, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "m")


def test_stop_matcher_holds_back_a_possible_start_and_cuts_at_the_first_stop():
    m = StopMatcher(("END", "\n\n"))
    assert m.push("abc E") == ("abc ", False)
    assert m.push("N") == ("", False)
    assert m.push("x\n") == ("ENx", False)
    assert m.push("\nrest") == ("", True)
    m = StopMatcher(("stop",))
    assert m.push("all of it st") == ("all of it ", False)
    assert m.flush() == "st"
    assert StopMatcher(()).push("anything") == ("anything", False)


def test_samples_after_the_first_get_their_own_seed_only_when_sampling():
    from pdmesh.common.v1 import common_pb2
    sampled = common_pb2.SamplingParams(temperature=0.7, seed=5)
    seeds = {sample_sampling(sampled, i).seed for i in range(16)}
    assert len(seeds) == 16 and sample_sampling(sampled, 0).seed == 5
    greedy = common_pb2.SamplingParams(seed=5)
    assert {sample_sampling(greedy, i).seed for i in range(4)} == {5}


def test_a_model_folder_template_renders_as_hugging_face_does(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    formatter = chat_template.load(str(tmp_path))
    text = formatter.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<s><|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert chat_template.load(str(tmp_path)).render([{"role": "user", "content": "x"}]) == "[x]"
    refusing = tmp_path / "refuse.jinja"
    refusing.write_text("{{ raise_exception('system messages are not supported') }}")
    with pytest.raises(errors.InvalidArgument) as err:
        chat_template.load(str(refusing)).render([{"role": "system", "content": "x"}])
    assert err.value.reason == "CHAT_TEMPLATE_ERROR"
    assert chat_template.load(None).render([{"role": "user", "content": "x"}]) == "User: x\nAssistant:"
    with pytest.raises(ValueError, match="neither a model folder nor a file"):
        chat_template.load(str(tmp_path / "missing"))
    (tmp_path / "broken.jinja").write_text("{% for %}")
    with pytest.raises(ValueError, match="does not compile"):
        chat_template.load(str(tmp_path / "broken.jinja"))


@pytest.mark.parametrize("error, status", [
    (errors.InvalidArgument("x"), 400), (errors.NotFound("x"), 404),
    (errors.FollowBootstrapRoomConflict("x"), 409), (errors.ResourceExhausted("x", retry_after_s=0.25), 429),
    (errors.Unavailable("x"), 503), (errors.DeadlineExceeded("x"), 504), (errors.Internal("x"), 500),
    (errors.DataLoss("x"), 500),
])
def test_grpc_codes_map_to_http_statuses_with_openai_bodies(error, status):
    reply = error_response(error)
    assert reply.status == status
    body = json.loads(reply.body)["error"]
    assert (body["message"], body["code"]) == ("x", error.reason)
    if status == 429:
        assert (reply.headers["Retry-After"], reply.headers["retry-after-ms"]) == ("1", "250")
    assert HTTP_STATUS.get(error.code, 500) == status
    assert grpc.StatusCode.FAILED_PRECONDITION in HTTP_STATUS
