"""Diffusion-/Flow-DPO: the loss by hand, shared noise and t, targets against the stock schedulers, the
direction of one step, preference data with bad rows, and the trainer end to end on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vialign import losses
from vialign.config import TrainConfig, load_config
from vialign.errors import VialignInputError
from vialign.preferences import read_preference_pairs
from vialign.trainer import Trainer

PROMPTS = ["a red square", "a blue circle", "a green triangle", "a white star"]


def test_dpo_loss_by_hand():
    e_w, e_l = torch.tensor([0.30, 0.50, 0.20]), torch.tensor([0.40, 0.45, 0.20])
    r_w, r_l = torch.tensor([0.35, 0.50, 0.25]), torch.tensor([0.35, 0.40, 0.25])
    out = losses.dpo_loss(e_w, e_l, r_w, r_l, beta=10.0)
    for i in range(3):
        inside = (e_w[i] - e_l[i]) - (r_w[i] - r_l[i])  # -0.10, -0.05, 0.0
        expected = math.log(1 + math.exp(0.5 * 10.0 * float(inside)))  # -log sigmoid(-beta/2 * inside)
        assert float(out.loss[i]) == pytest.approx(expected, rel=1e-6)
    assert out.implicit_accuracy.tolist() == [1.0, 1.0, 0.5]  # a tie counts one half
    assert out.model_diff.tolist() == pytest.approx([-0.10, 0.05, 0.0])
    # policy == reference: exactly log 2, whatever the errors, and accuracy one half (no division by zero)
    same = losses.dpo_loss(e_w, e_l, e_w.clone(), e_l.clone(), beta=5000.0)
    assert torch.equal(same.loss, torch.full((3,), math.log(2.0)))
    assert same.implicit_accuracy.tolist() == [0.5, 0.5, 0.5]


def test_dpo_loss_gradient_matches_autograd_reference():
    e_w = torch.tensor([0.3, 0.7], requires_grad=True)
    e_l = torch.tensor([0.5, 0.2], requires_grad=True)
    out = losses.dpo_loss(e_w, e_l, torch.tensor([0.4, 0.6]), torch.tensor([0.4, 0.3]), beta=4.0)
    out.loss.sum().backward()
    inside = (e_w.detach() - e_l.detach()) - torch.tensor([0.0, 0.3])
    # d/d e_w of softplus(beta/2 * inside) = beta/2 * sigmoid(beta/2 * inside); d/d e_l the negative
    expected = 2.0 * torch.sigmoid(2.0 * inside)
    torch.testing.assert_close(e_w.grad, expected)
    torch.testing.assert_close(e_l.grad, -expected)


@pytest.mark.parametrize("family", ["sd", "sd-v", "sd3"])
def test_targets_match_the_stock_schedulers(family, tiny_dir, quiet_libraries):
    """x_t = alpha_t x0 + sigma_t eps with (alpha, sigma) = adapter.coefficients(t), and the target, agree
    with the stock DDPMScheduler's add_noise / get_velocity, and for flow models with rectified flow's
    x_t = (1 - t/T) x0 + (t/T) eps, whose velocity is eps - x0."""
    from diffusers import DDPMScheduler

    import pipelines

    adapter = pipelines.load_pipeline(tiny_dir(family), device="cpu")
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    if adapter.kind == "flow":
        t = torch.tensor([100.0, 500.0, 900.0])
        alpha, sigma = adapter.coefficients(t)
        x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
        expected_x_t = (1 - t / 1000).view(-1, 1, 1, 1) * x0 + (t / 1000).view(-1, 1, 1, 1) * eps
        torch.testing.assert_close(x_t, expected_x_t)
        target = losses.denoising_target("flow", x0, eps, alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1))
        torch.testing.assert_close(target, eps - x0)  # d x_t / d t in sigma units
        return
    t = torch.tensor([10, 400, 990])
    alpha, sigma = adapter.coefficients(t)
    stock = DDPMScheduler.from_config(adapter.scheduler.config)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x_t, stock.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    target = losses.denoising_target(
        adapter.prediction_type, x0, eps, alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    )
    expected = stock.get_velocity(x0, eps, t) if adapter.prediction_type == "v_prediction" else eps
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)


def _png(path: Path, colour, shape="square") -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    if shape == "square":
        image[8:24, 8:24] = colour
    else:
        yy, xx = np.mgrid[:32, :32]
        image[(yy - 16) ** 2 + (xx - 16) ** 2 < 64] = colour
    Image.fromarray(image).save(path)


@pytest.fixture
def pair_file(tmp_path) -> Path:
    rows = []
    colours = [(230, 40, 40), (40, 80, 240), (40, 200, 60), (240, 240, 240)]
    for i, (prompt, colour) in enumerate(zip(PROMPTS, colours)):
        _png(tmp_path / f"{i}_w.png", colour, "square")
        _png(tmp_path / f"{i}_l.png", colour, "circle")
        rows.append({"prompt": prompt, "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return path


def test_bad_preference_rows_are_reported_and_skipped(tmp_path, pair_file, caplog):
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    extra = [
        {"prompt": "a missing image", "chosen": "nowhere.png", "rejected": "0_l.png"},
        {"prompt": "the same image twice", "chosen": "0_w.png", "rejected": "0_w.png"},
        {"prompt": "   ", "chosen": "1_w.png", "rejected": "1_l.png"},
        {"prompt": "no rejected", "chosen": "1_w.png"},
    ]
    with pair_file.open("a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in extra) + "{not json\n")
    data = read_preference_pairs(str(pair_file))
    assert len(data.pairs) == 4
    reasons = "\n".join(data.skipped)
    for row, reason in [
        (5, "not found"),
        (6, "the same image"),
        (7, "empty caption"),
        (8, "no string rejected"),
        (9, "not valid JSON"),
    ]:
        assert f"pairs.jsonl:{row}: " in reasons and reason in reasons, (row, reason, reasons)
    assert "skipped preference row" in caplog.text
    with pytest.raises(VialignInputError, match="is a prompt set.*shapeworld:preferences"):
        read_preference_pairs("shapeworld:align")
    with pytest.raises(VialignInputError, match="preference file not found"):
        read_preference_pairs(str(tmp_path / "absent.jsonl"))


def test_shipped_pairs_never_hold_an_eval_prompt():
    from rewards import shapeworld as sw

    data = read_preference_pairs("shapeworld:preferences")
    prompts = {pair.prompt for pair in data.pairs}
    assert len(data.pairs) == 587 and not prompts & set(sw.eval_prompts())  # 705 shipped, 118 on eval prompts


@pytest.mark.slow
def test_implicit_accuracy_rises_on_held_back_pairs(tmp_path, quiet_libraries):
    """A short offline Flow-DPO run on the testbed (its preset, 300 steps) trained on four fifths of the
    shipped pairs: on the fifth held back, at fixed noise and t, the margin (e_w - e_l) - (e_w_ref -
    e_l_ref) is exactly 0 before training (policy = reference) and afterwards negative on average (more
    than two standard errors over pairs) and on more than 55% of the pairs."""
    from vialign.algorithms.dpo import dpo_timesteps, pair_errors
    from vialign.preferences import encode_pairs

    pairs = read_preference_pairs("shapeworld:preferences").pairs
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    held, trained = [pairs[i] for i in order[:120]], [pairs[i] for i in order[120:]]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(
        "".join(
            json.dumps({"prompt": p.prompt, "chosen": str(p.chosen), "rejected": str(p.rejected)}) + "\n"
            for p in trained
        )
    )
    config = load_config(
        TrainConfig,
        Path(__file__).resolve().parents[1] / "configs" / "quickstart_dpo.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={train_file}",
            "train.max_steps=300",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
        ],
    )
    trainer = Trainer(config, progress=False)
    adapter, settings = trainer.adapter, config.settings
    height, width = trainer.image_size()
    latents = encode_pairs(held, adapter, height, width)
    draws = 32  # noise and t draws per held-back pair (the margin of one draw is mostly t-noise)
    generator = torch.Generator().manual_seed(1)
    index = torch.arange(len(held)).repeat(draws)
    t = dpo_timesteps(adapter, len(index), settings, generator)
    noise = torch.randn((len(index), *latents.chosen.shape[1:]), generator=generator)
    cond = adapter.encode_prompt([latents.prompts[i] for i in index] * 2)
    x0 = torch.cat([latents.chosen[index], latents.rejected[index]])

    def errors(rows: slice = slice(None)) -> torch.Tensor:
        """Per-sample errors of winners then losers (each pass is ~20 s, so the reference's is made once:
        training never changes it)."""
        n = len(index)
        keep = torch.cat([torch.arange(n)[rows], torch.arange(n, 2 * n)[rows]])
        with torch.no_grad():
            return pair_errors(
                adapter, x0[keep], noise.repeat(2, 1, 1, 1)[keep], t.repeat(2)[keep], cond[keep]
            )

    with adapter.lora_disabled():
        ref = errors()
    n = len(index)
    before = errors(slice(0, 240))  # the policy before training is the reference: checked on 240 draws
    assert (before - torch.cat([ref[:240], ref[n : n + 240]])).abs().max() < 1e-6
    trainer.train()
    policy = errors()
    after = ((policy[:n] - policy[n:]) - (ref[:n] - ref[n:])).view(draws, -1).mean(0)  # per pair
    accuracy = float((after < 0).float().mean())
    mean, se = float(after.mean()), float(after.std() / math.sqrt(len(after)))
    print(f"held-back implicit accuracy {accuracy:.3f}, mean margin {mean:.2e} ± {se:.1e}")
    # measured: 0.575 of the 120 pairs, mean -3.8e-4 ± 1.3e-4: a real but modest held-back gain
    assert accuracy > 0.55 and mean < -2 * se, (accuracy, mean, se)


def dpo_config(tmp_path, model, pair_file, **overrides) -> TrainConfig:
    base = [
        "algorithm=dpo",
        f"model.path={model}",
        f"output_dir={tmp_path / 'run'}",
        f"data.train={pair_file}",
        f"data.eval={pair_file.parent / 'prompts.txt'}",
        "rewards={}",
        "eval.rewards=[brightness]",
        "finetune.lora_rank=4",
        "optim.lr=1e-3",
        "sampler.height=32",
        "sampler.width=32",
        "dpo.beta=100",
        "dpo.pairs_per_step=4",
        "dpo.micro_batch_size=2",
        "train.max_steps=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
    ]
    return load_config(
        TrainConfig, None, base + [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    )


def test_winner_and_loser_share_noise_and_timestep(
    tmp_path, tiny_dir, pair_file, quiet_libraries, monkeypatch
):
    """Every denoiser call of a DPO step holds the winners then the losers of the same pairs; recovering
    eps = (x_t - alpha_t x0) / sigma_t from the inputs gives the same noise and t for both."""
    trainer = Trainer(dpo_config(tmp_path, tiny_dir("sd3"), pair_file), progress=False)
    adapter = trainer.adapter
    calls = []
    original = adapter.predict

    def predict(latents, timestep, cond, *args, **kwargs):
        calls.append((latents.detach().clone(), torch.as_tensor(timestep).clone()))
        return original(latents, timestep, cond, *args, **kwargs)

    monkeypatch.setattr(adapter, "predict", predict)
    chosen, rejected = trainer.preferences.chosen, trainer.preferences.rejected
    from vialign.data import prompts_for_step

    indices = prompts_for_step(range(len(chosen)), 1, 4, 0)
    trainer.algorithm.step(1)
    assert len(calls) == 4  # 2 micro-batches x (reference, policy)
    for number, (x_t, t) in enumerate(calls):
        n = len(t) // 2
        assert torch.equal(t[:n], t[n:])
        alpha, sigma = adapter.coefficients(t)
        pairs = indices[(number // 2) * 2 : (number // 2) * 2 + 2]
        x0 = torch.cat([chosen[pairs], rejected[pairs]])
        eps = (x_t - alpha.view(-1, 1, 1, 1) * x0) / sigma.view(-1, 1, 1, 1)
        torch.testing.assert_close(eps[:n], eps[n:], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(x_t[:n], x_t[n:])  # different images, same noise
    assert torch.equal(calls[0][0], calls[1][0])  # the reference and the policy see the same inputs


def test_one_step_moves_the_implicit_reward_the_right_way(tmp_path, tiny_dir, pair_file, quiet_libraries):
    """With a small lr, one step lowers (e_w - e_l) - (e_w_ref - e_l_ref) on the step's own pairs at the
    step's own noise and t (first order: the step goes down the loss's gradient); before it, the policy is
    the reference, so the loss is log 2 exactly."""
    from vialign.algorithms.dpo import dpo_timesteps, pair_errors

    trainer = Trainer(dpo_config(tmp_path, tiny_dir("sd3"), pair_file, optim__lr=1e-4), progress=False)
    adapter, latents, settings = trainer.adapter, trainer.preferences, trainer.config.settings

    def inside() -> torch.Tensor:
        generator = torch.Generator().manual_seed(trainer.algorithm.context.sample_seed(1, 2**43))
        t = dpo_timesteps(adapter, 4, settings, generator)
        noise = torch.randn((4, *latents.chosen.shape[1:]), generator=generator)
        from vialign.data import prompts_for_step

        index = torch.tensor(prompts_for_step(range(4), 1, 4, 0))
        x0 = torch.cat([latents.chosen[index], latents.rejected[index]])
        cond = adapter.encode_prompt([latents.prompts[i] for i in index] * 2)
        with torch.no_grad():
            policy = pair_errors(adapter, x0, noise.repeat(2, 1, 1, 1), t.repeat(2), cond)
            with adapter.lora_disabled():
                ref = pair_errors(adapter, x0, noise.repeat(2, 1, 1, 1), t.repeat(2), cond)
        return (policy[:4] - policy[4:]) - (ref[:4] - ref[4:])

    before = inside()
    metrics = trainer.algorithm.step(1)
    assert torch.all(before.abs() < 1e-6) and metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    after = inside()
    assert float(after.mean()) < 0, after


def test_dpo_trains_and_exports_lora(tmp_path, tiny_dir, pair_file, quiet_libraries):
    from diffusers import StableDiffusion3Pipeline

    config = dpo_config(tmp_path, tiny_dir("sd3"), pair_file, train__max_steps=2, train__eval_every=2)
    Trainer(config, progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "implicit_accuracy" in r]
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any("eval/brightness" in r for r in rows)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir("sd3"))
    pipe.load_lora_weights(tmp_path / "run" / "final")


def test_latent_cache_encodes_each_image_once(tmp_path, tiny_dir, pair_file, quiet_libraries, monkeypatch):
    """The first pass encodes every distinct image (posterior means, as adapter.encode gives them); a
    second pass reads them all from the cache; a lost shard (an interrupted run) is re-encoded alone.
    A corrupt image skips its pair with the row and the reason."""
    import pipelines
    from vialign.preferences import encode_pairs

    adapter = pipelines.load_pipeline(tiny_dir("sd3"), device="cpu")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    with pair_file.open("a") as handle:
        handle.write(
            json.dumps({"prompt": "a broken pair", "chosen": "corrupt.png", "rejected": "0_l.png"}) + "\n"
        )
    pairs = read_preference_pairs(str(pair_file)).pairs
    calls = []
    original = adapter.encode
    monkeypatch.setattr(
        adapter, "encode", lambda pixels, **kw: calls.append(len(pixels)) or original(pixels, **kw)
    )
    first = encode_pairs(pairs, adapter, 32, 32, batch_size=3, cache_dir=tmp_path / "cache")
    assert (
        first.encoded == 8 and sum(calls) == 8
    )  # 4 pairs x 2 distinct images; the corrupt one fails to decode
    assert len(first.prompts) == 4 and len(first.skipped) == 1
    assert first.skipped[0].startswith(f"{pair_file}:5: image cannot be decoded")
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "0_w.png"))).permute(2, 0, 1).float() / 255
    reference = original(pixels[None], sample=False)
    torch.testing.assert_close(first.chosen[0], reference[0], rtol=1e-5, atol=1e-5)
    calls.clear()
    second = encode_pairs(pairs, adapter, 32, 32, batch_size=3, cache_dir=tmp_path / "cache")
    assert second.encoded == 0 and calls == [] and torch.equal(second.chosen, first.chosen)
    shards = sorted((tmp_path / "cache").glob("*/shard-*.safetensors"))
    assert len(shards) == 3  # batches of 3 distinct images: 3 + 3 + 2 (corrupt one dropped from the last)
    shards[-1].unlink()
    third = encode_pairs(pairs, adapter, 32, 32, batch_size=3, cache_dir=tmp_path / "cache")
    assert third.encoded == 2 and torch.equal(third.rejected, first.rejected)  # the last shard's two images


def test_pickapic_schema(tmp_path):
    """A saved dataset in the Pick-a-Pic v2 schema: label_0 = 1 keeps the order, 0 flips it, 0.5 (a tie)
    is dropped; identical images and empty captions are skipped with their row."""
    import datasets

    def png(colour) -> bytes:
        path = tmp_path / "image.png"
        _png(path, colour)
        return path.read_bytes()

    red, blue, green = png((230, 40, 40)), png((40, 80, 240)), png((40, 200, 60))
    rows = {
        "caption": ["red over blue", "blue over red", "a tie", "twins", "", "green over red"],
        "jpg_0": [red, red, red, red, red, green],
        "jpg_1": [blue, blue, blue, red, blue, red],
        "label_0": [1.0, 0.0, 0.5, 1.0, 1.0, 1.0],
    }
    folder = tmp_path / "pickapic"
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    data = read_preference_pairs(str(folder))
    assert [p.prompt for p in data.pairs] == ["red over blue", "blue over red", "green over red"]
    assert (data.pairs[0].chosen, data.pairs[0].rejected) == (red, blue)
    assert (data.pairs[1].chosen, data.pairs[1].rejected) == (blue, red)  # label_0 == 0: flipped
    assert data.skipped == [
        f"{folder}[2]: a tie (label_0=0.5)",
        f"{folder}[3]: chosen and rejected are the same image",
        f"{folder}[4]: empty caption",
    ]
    datasets.Dataset.from_dict({"prompt": ["x"], "image": [red]}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(VialignInputError, match="not in the Pick-a-Pic v2 schema: no column caption, jpg_0"):
        read_preference_pairs(str(tmp_path / "other"))


def test_online_dpo_pairs_the_best_sample_with_the_worst(
    tmp_path, tiny_dir, pair_file, quiet_libraries, monkeypatch
):
    """Each prompt's pair is its highest- and lowest-reward sample among samples_per_prompt ODE samples
    drawn at the step's seeds: checked against the same samples made by vialign.sample.generate_images."""
    import rewards
    from vialign.algorithms import sample_seed
    from vialign.sample import generate_images

    prompts_file = pair_file.parent / "prompts.txt"
    config = load_config(
        TrainConfig,
        None,
        [
            "algorithm=online_dpo",
            f"model.path={tiny_dir('sd3')}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={prompts_file}",
            f"data.eval={prompts_file}",
            "rewards={brightness: {weight: 1.0}}",
            "finetune.lora_rank=4",
            "sampler.height=32",
            "sampler.width=32",
            "sampler.num_steps=4",
            "online_dpo.beta=100",
            "online_dpo.samples_per_prompt=3",
            "online_dpo.pairs_per_step=2",
            "online_dpo.micro_batch_size=1",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            "train.tensorboard=false",
        ],
    )
    trainer = Trainer(config, progress=False)
    algorithm, adapter = trainer.algorithm, trainer.adapter
    captured = {}
    original = algorithm.dpo_update

    def dpo_update(step, prompts, chosen, rejected, count, lo):
        captured.update(prompts=prompts, chosen=chosen, rejected=rejected)
        return original(step, prompts, chosen, rejected, count, lo)

    monkeypatch.setattr(algorithm, "dpo_update", dpo_update)
    metrics = algorithm.step(1)
    from vialign.data import prompts_for_step

    step_prompts = prompts_for_step(PROMPTS, 1, 2, 0)
    batch = [p for p in step_prompts for _ in range(3)]
    seeds = [sample_seed(0, 1, g) for g in range(6)]
    pixels = torch.cat(
        [
            p
            for _, p in generate_images(
                adapter, batch, seeds, num_steps=4, height=32, width=32, guidance=algorithm.context.guidance
            )
        ]
    )
    scores = rewards.load_reward("brightness")(pixels, batch).score.view(2, 3)
    brightness = rewards.load_reward("brightness")
    with torch.no_grad():
        chosen = brightness(adapter.decode(captured["chosen"]), step_prompts).score
        rejected = brightness(adapter.decode(captured["rejected"]), step_prompts).score
    assert captured["prompts"] == step_prompts
    torch.testing.assert_close(chosen, scores.max(1).values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rejected, scores.min(1).values, rtol=1e-4, atol=1e-4)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward/mean"] == pytest.approx(float(scores.mean()), abs=1e-4)
