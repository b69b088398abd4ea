"""Every registered backend passes the shared contract of backend_contract.py (micro configs)."""

from backend_contract import BackendCase, BackendContract, randomize_named

from rgbt_seg_ros.models import available_backends


def _sartm_freeze(cfg: dict, path: str) -> None:
    cfg["encoder"].update(checkpoint=path, freeze=True)
    cfg["decoder"]["freeze_transformer"] = True


def _encoder_freeze(cfg: dict, path: str) -> None:
    cfg["encoder"].update(checkpoint=path, freeze=True)


SARTM_CASE = BackendCase(
    name="sartm",
    config="models/sartm_micro.yaml",
    trainable_prefixes=(
        "rectify.",
        "fuse.",
        "language.",
        "aux_head.",
        "sam_head.mask_decoder.mask_tokens.",
        "sam_head.mask_decoder.output_hypernetworks_mlps.",
        "sam_head.mask_decoder.output_upscaling.",
        "sam_head.mask_decoder.conv_s0.",
        "sam_head.mask_decoder.conv_s1.",
    ),
    frozen_prefixes=("image_encoder.trunk.", "image_encoder.neck.", "sam_head.mask_decoder.transformer."),
    thermal_param="image_encoder.trunk.blocks.0.attn.q.lora_A.thermal.weight",
    freeze_with_base=_sartm_freeze,
    randomize=lambda model: randomize_named(model, (".lora_B.",)),
)

CPAL_CASE = BackendCase(
    name="cpal",
    config="models/cpal_micro.yaml",
    trainable_prefixes=("mcp.", "gpm.", "head."),
    frozen_prefixes=("trunk.patch_embed.", "trunk.blocks.0.", "trunk.blocks.4.attn.q.base_layer."),
    thermal_param="mcp.0.attn_prompt.from_thermal.down.weight",
    freeze_with_base=_encoder_freeze,
    randomize=lambda model: randomize_named(model, (".lora_B.", ".up.")),
)

FUSIONSAM_CASE = BackendCase(
    name="fusionsam",
    config="models/fusionsam_micro.yaml",
    trainable_prefixes=("lstg.", "fmp.", "prompt_encoder.", "sam_head.mask_decoder."),
    frozen_prefixes=(
        "image_encoder.trunk.",
        "image_encoder.neck.",
        "sam_head.no_mask_embed.",
        "sam_head.mask_decoder.iou_prediction_head.",
    ),
    thermal_param="lstg.thermal.encoder.0.weight",
    freeze_with_base=_encoder_freeze,
    has_aux_losses=True,
    aux_only_param="lstg.rgb.decoder.0.weight",  # the reconstruction loss is all that reaches the VQ decoder
)

SEGRGBX_CASE = BackendCase(
    name="segrgbx",
    config="models/segrgbx_micro.yaml",
    trainable_prefixes=("control.", "aligned_prompts.", "frm.", "ffm.", "dsrm.", "head."),
    frozen_prefixes=("trunk.", "ma_clip."),  # MA-CLIP trains only in its own stage (test_models_segrgbx.py)
    thermal_param="aligned_prompts.thermal.0",
    freeze_with_base=_encoder_freeze,
    randomize=lambda model: randomize_named(model, ("lora_B", "dsrm.out.")),
)


def test_every_registered_backend_has_a_contract_case():
    covered = {case.name for case in (SARTM_CASE, CPAL_CASE, FUSIONSAM_CASE, SEGRGBX_CASE)}
    assert set(available_backends()) == covered


class TestSartmContract(BackendContract):
    case = SARTM_CASE


class TestCpalContract(BackendContract):
    case = CPAL_CASE


class TestFusionSamContract(BackendContract):
    case = FUSIONSAM_CASE


class TestSegRGBXContract(BackendContract):
    case = SEGRGBX_CASE
