"""hycam.evaluation.precision: bf16 is the default only where the CPU lists a bf16 instruction set."""

import pytest

from hycam.evaluation.precision import cpu_has_native_bf16

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"


@pytest.mark.parametrize("text, expected", [(ZEN4, True), (SKYLAKE, False),
                                            (SKYLAKE.replace("avx512bw", "amx_bf16 amx_tile"), True)])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, expected):
    (tmp_path / "cpuinfo").write_text(text)
    assert cpu_has_native_bf16(tmp_path / "cpuinfo") is expected


def test_an_unreadable_cpuinfo_means_no_native_bf16(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "missing") is False
