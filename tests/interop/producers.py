"""Adapters written by the real producers' own code, with the weights each producer itself applies.

Each ``make_*`` writes an adapter file from models that hold the test
checkpoint's weights and returns the producer's weights for every LoRA target
of the components it covers: after diffusers' ``fuse_lora`` (PEFT), or read
through the forward of the layers LyCORIS wrapped (not LyCORIS's merge helper,
which applies alpha/rank twice for LoHa and LoKr in 4.1.3). Producers run in
float64 unless said otherwise, on factors that are float32 numbers, so their
result is the float32 file's exact value to ~1e-16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from interop_harness import Setup, fused_weights
from interop_models import read_tensors

UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every adapter tensor trained-looking values (PEFT starts lora_B at 0 and the magnitude at ‖W‖)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=generator))


def _loader(setup: Setup):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    return StableDiffusionXLLoraLoaderMixin if setup.arch.name == "sdxl" else StableDiffusionLoraLoaderMixin


def _fuse(models, strength: float) -> None:
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    for component, model in models.items():
        model.double()
        if component == "unet":
            model.fuse_lora(lora_scale=strength)
        else:
            fuse_text_encoder_lora(model, lora_scale=strength)


def make_peft(
    setup: Setup,
    path: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: float = 8,
    rslora: bool = False,
    dora: bool = False,
    components=("unet", "text_encoder"),
    layout: str = "peft",
    strength: float = 1.0,
) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT LoRA: ``add_adapter`` on each model, saved the way diffusers saves it.

    layout "peft": ``save_lora_weights`` with the adapters' LoraConfig as
    ``lora_adapter_metadata``. "training_script": first through
    ``convert_state_dict_to_diffusers`` and without metadata (diffusers'
    training scripts: ``.lora.down``/``.lora_linear_layer.down`` keys).
    "kohya": through ``convert_state_dict_to_kohya`` (``lora_unet_…``,
    ``lora_te1_…``, int64 alphas), saved with safetensors.
    Returns the weights after diffusers' ``fuse_lora(lora_scale=strength)``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    models = setup.models(components)
    layers, metadata = {}, {}
    for offset, (component, model) in enumerate(models.items()):
        config = LoraConfig(
            r=rank, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, init_lora_weights=True,
            target_modules=UNET_TARGETS if component == "unet" else TE_TARGETS,
        )
        model.add_adapter(config)
        _randomize(model, seed + offset)
        layers[component] = get_peft_model_state_dict(model)
        metadata[component] = model.peft_config["default"].to_dict()
    if layout == "kohya":
        from diffusers.utils import convert_state_dict_to_kohya

        prefixed = {f"{c}.{k}": v for c, state in layers.items() for k, v in state.items()}
        save_file({k: v.contiguous() for k, v in convert_state_dict_to_kohya(prefixed).items()}, str(path))
    else:
        kwargs = {}
        if layout == "training_script":
            from diffusers.utils import convert_state_dict_to_diffusers

            layers = {c: convert_state_dict_to_diffusers(state) for c, state in layers.items()}
        else:
            kwargs = {f"{c}_lora_adapter_metadata": m for c, m in metadata.items()}
        _loader(setup).save_lora_weights(
            str(path.parent), weight_name=path.name, **{f"{c}_lora_layers": s for c, s in layers.items()}, **kwargs
        )
    _fuse(models, strength)
    return fused_weights(models, setup.specs(models))


LYCORIS_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def make_lycoris(
    setup: Setup,
    path: Path,
    *,
    seed: int,
    algo: str,
    components=("unet", "text_encoder"),
    float64: bool = True,
    multiplier: float = 1.0,
    **options,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LyCORIS adapter: ``create_lycoris`` on each model (kohya prefixes), weights randomised, ``save_weights``.

    Returns (weights, biases) the wrapped layers' forward applies, for every
    LoRA target of ``components`` (biases only where they differ from the
    base). ``float64``: run the forward in float64 (its own float32 epsilon in
    DoRA's norm then becomes float64's; run DoRA in float32).
    """
    from lycoris import LycorisNetwork, create_lycoris

    models = setup.models(components)
    state, networks = {}, []
    generator = torch.Generator().manual_seed(seed)
    saved_prefix = LycorisNetwork.LORA_PREFIX
    try:
        for component, model in models.items():
            LycorisNetwork.LORA_PREFIX = LYCORIS_PREFIX[component]
            network = create_lycoris(model, multiplier, algo=algo, warn_on_unmatched=False, **options)
            network.apply_to()
            with torch.no_grad():
                for name, param in network.named_parameters():
                    if "dora_scale" in name:
                        param.mul_(0.5 + torch.rand(param.shape, generator=generator))
                    elif algo == "full":
                        param.add_(torch.randn(param.shape, generator=generator) * 0.01)
                    else:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            state.update({k: v.detach().clone().contiguous() for k, v in network.state_dict().items()})
            networks.append(network)
    finally:
        LycorisNetwork.LORA_PREFIX = saved_prefix
    save_file(state, str(path))
    if float64:
        for component, model in models.items():
            model.double()
        for network in networks:
            network.double()
    from interop_models import forward_bias

    specs = setup.specs(models)
    dtype = torch.float64 if float64 else torch.float32
    weights = fused_weights(models, specs, forward=True, dtype=dtype)
    biases = {}
    from interop_models import target_module

    base = read_tensors(setup.base)
    for spec in specs:
        if spec.bias_key is None:
            continue
        bias = forward_bias(target_module(models, spec), spec.shape, dtype)
        if not torch.equal(bias.float(), base[spec.bias_key]):
            biases[spec.diffusers] = bias
    return weights, biases
