"""Shared pytest fixtures: tiny random VLMs built offline, a test image, and CPU settings for tiny models.

OMP_WAIT_POLICY is set to PASSIVE before torch is imported: on a shared 2-core machine, OpenMP's default spinning
made a tiny model's generate+step 3-4x slower when another process kept one core busy (measured: 8 rollouts x 16
tokens 400 ms ACTIVE vs 108 ms PASSIVE; the same ~100 ms either way on an idle machine). TRITON_INTERPRET=1 runs the
Triton kernels on CPU. Values already in the environment win.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Triton reads TRITON_INTERPRET when it is first imported, and any test module may import it first (through
# ttrv_edge.kernels): the suite is CPU-only, so the interpreter is switched on for the whole session.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# tests/helpers.py holds checks shared by several test files: rewrite its asserts like a test module's
pytest.register_assert_rewrite("helpers")


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory):
    """A tiny random Idefics3 (SmolVLM family) saved like a hub model (never in the user's cache)."""
    from ttrv_edge.models.builders import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-idefics3"), "idefics3")


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory):
    """A tiny random Qwen2-VL saved like a hub model (never in the user's cache)."""
    from ttrv_edge.models.builders import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2-vl"), "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, request):
    """``tiny_family_dir(model_type)``: the tiny random model of any family (``models.families.FAMILIES``), built
    once per session on first use (never in the user's cache; Idefics3 and Qwen2-VL are the fixtures above)."""
    from ttrv_edge.models.builders import build_tiny_vlm

    shared = {"idefics3": "tiny_idefics3_dir", "qwen2_vl": "tiny_qwen2vl_dir"}
    built = {}

    def get(model_type: str):
        if model_type in shared:
            return request.getfixturevalue(shared[model_type])
        if model_type not in built:
            built[model_type] = build_tiny_vlm(tmp_path_factory.mktemp(f"tiny-{model_type}"), model_type)
        return built[model_type]

    return get


@pytest.fixture
def test_image():
    """A 64x64 RGB image: a red circle and a blue square on white."""
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 30, 30), fill=(220, 30, 30))
    draw.rectangle((36, 34, 58, 56), fill=(30, 60, 220))
    return image
