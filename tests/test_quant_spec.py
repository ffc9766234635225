"""QuantSpec: parsing, canonical printing, validation messages and exact storage accounting."""

import itertools

import pytest

from workbench.errors import WorkbenchError
from workbench.quant.spec import QuantSpec

INT_SPECS = [
    f"int{b}_{g}{s}{a}"
    for b, g, s, a in itertools.product(
        range(2, 9),
        ["g16", "g32", "g64", "g128", "g256", "g96", "ch", "t"],
        ["", "_sym"],
        ["", ":gptq", ":awq"],
    )
]
FLOAT_SPECS = [
    "bf16",
    "fp16",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_e4m3_t",
    "fp8_e5m2_t",
    "fp4_e2m1_g32",
    "fp4_e2m1_g16",
    "mxfp4",
    "nvfp4",
    "nf4_g64",
    "nf4_g128",
]


@pytest.mark.parametrize("s", INT_SPECS + FLOAT_SPECS)
def test_canonical_round_trip(s):
    q = QuantSpec.parse(s)
    assert str(q) == s  # every string in the lists is canonical
    assert QuantSpec.parse(str(q)) == q


@pytest.mark.parametrize(
    "s,canon",
    [
        ("int4_g128_asym", "int4_g128"),
        ("int4_g128_asym:rtn", "int4_g128"),
        ("INT4_G128:GPTQ", "int4_g128:gptq"),
        ("int8_sym_ch", "int8_ch_sym"),
        ("fp8_e4m3_ch", "fp8_e4m3"),
        ("fp8_e4m3:rtn", "fp8_e4m3"),
        ("nf4_g64_sym", "nf4_g64"),
        (" int3_g64 ", "int3_g64"),
    ],
)
def test_non_canonical_inputs_print_canonically(s, canon):
    assert str(QuantSpec.parse(s)) == canon


def test_fields():
    q = QuantSpec.parse("int3_g64_sym:gptq")
    assert (q.fmt, q.bits, q.granularity, q.group_size, q.symmetric, q.algo) == (
        "int",
        3,
        "group",
        64,
        True,
        "gptq",
    )
    assert QuantSpec.parse("mxfp4").group_size == 32 and QuantSpec.parse("nvfp4").group_size == 16
    assert QuantSpec.parse("fp8_e5m2").granularity == "channel"
    assert not QuantSpec.parse("bf16").is_quantized


@pytest.mark.parametrize(
    "s,msg",
    [
        ("int4_g12x", "unknown part 'g12x' in spec 'int4_g12x'"),
        ("int9_g128", "bits 9 outside 2..8 in 'int9_g128'"),
        ("int1_ch", "bits 1 outside 2..8"),
        ("int4_g8", "group size 8 outside 16..256 in 'int4_g8'"),
        ("int4_g512", "group size 512 outside 16..256"),
        ("int4", "needs a granularity"),
        ("int4_g128:foo", "unknown algorithm 'foo'"),
        ("nvfp4:gptq", "applies to int specs only"),
        ("fp8_e4m3:awq", "applies to int specs only"),
        ("fp8_e4m3_asym", "'asym' does not apply"),
        ("fp8_e3m4", "unknown part 'e3m4'"),
        ("mxfp4_g64", "fixed block of 32"),
        ("nf4", "needs a group size"),
        ("int4_g128_ch", "second granularity 'ch'"),
        ("int4_g128_sym_asym", "second symmetry part 'asym'"),
        ("float4", "unknown part 'float4'"),
        ("bf16_ch", "part 'ch' does not apply to bf16"),
        ("", "empty"),
        ("int4__g128", "empty part"),
    ],
)
def test_bad_specs_name_the_bad_part(s, msg):
    with pytest.raises(WorkbenchError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        QuantSpec.parse(s)


def test_direct_construction_is_validated():
    with pytest.raises(WorkbenchError, match="bits 9 outside"):
        QuantSpec("int", 9, "group", 128, False)
    with pytest.raises(WorkbenchError, match="int specs only"):
        QuantSpec("nf4", 4, "group", 64, True, "gptq")


@pytest.mark.parametrize(
    "s,K,N,expected",
    [
        ("int4_g128", 4096, 1, 4.25),  # 4 + (16 + 16) / 128
        ("int4_g128_sym", 4096, 1, 4.125),  # 4 + 16 / 128
        ("int3_g128", 1024, 1, 3.25),  # 3-bit codes stored at 3 bits
        ("int8_ch", 576, 1, 8 + 32 / 576),
        ("int8_ch_sym", 576, 7, 8 + 16 / 576),
        ("int4_t", 100, 10, 4 + 32 / 1000),
        ("fp8_e4m3", 64, 1, 8.5),  # fp32 scale per row
        ("fp8_e5m2_t", 64, 4, 8 + 32 / 256),
        ("fp4_e2m1_g32", 64, 1, 4.5),
        ("mxfp4", 4096, 1, 4.25),  # 8-bit E8M0 per 32
        ("nf4_g64", 4096, 1, 4.25),
        ("bf16", 10, 10, 16.0),
        ("int4_g128:awq", 128, 64, 4.25 + 16 / 64),  # + fp16 input scale per input channel
    ],
)
def test_bits_per_weight_by_hand(s, K, N, expected):
    assert QuantSpec.parse(s).bits_per_weight(out_features=N, in_features=K) == pytest.approx(
        expected, abs=1e-12
    )


def test_nvfp4_bits_include_the_tensor_scale():
    N, K = 576, 1536
    assert QuantSpec.parse("nvfp4").bits_per_weight(out_features=N, in_features=K) == pytest.approx(
        4.5 + 32 / (N * K), abs=1e-12
    )


def test_shorter_last_group_is_counted():
    # K = 576 = 4 * 128 + 64: five groups per row, the last one of 64 columns still has a full scale+zero.
    q = QuantSpec.parse("int4_g128")
    assert q.n_groups(576) == 5
    assert q.bits_per_weight(out_features=3, in_features=576) == pytest.approx(4 + 5 * 32 / 576, abs=1e-12)
    assert q.storage_bits(3, 576) == 3 * (576 * 4 + 5 * 32)
    # stories260K FFN: K = 172 with g64 -> 3 groups (64, 64, 44)
    assert QuantSpec.parse("nf4_g64").storage_bits(64, 172) == 64 * (172 * 4 + 3 * 16)
    # mxfp4 with K = 48: a full block of 32 and a short block of 16
    assert QuantSpec.parse("mxfp4").storage_bits(2, 48) == 2 * (48 * 4 + 2 * 8)


def test_storage_bytes_rounds_up():
    q = QuantSpec.parse("int3_g16_sym")
    bits = q.storage_bits(1, 17)  # 51 code bits + 2 scales * 16
    assert bits == 51 + 32
    assert q.storage_bytes(1, 17) == -(-bits // 8)


@pytest.mark.parametrize("s", ["int4_g128", "mxfp4", "nvfp4", "nf4_g64", "fp8_e4m3", "int2_t"])
def test_check_layer_accepts_any_nonempty_shape(s):
    q = QuantSpec.parse(s)
    for N, K in [(1, 1), (64, 172), (576, 576), (49152, 576), (3, 17)]:
        assert q.check_layer(N, K) is None
    assert "empty" in q.check_layer(0, 64)
