"""The engine process's CPU settings: the thread-count variable and glibc's malloc thresholds."""

from __future__ import annotations

import platform

import pytest
import torch

from model_handler import cpu_threads, envs


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_is_every_available_cpu_on_cpu_and_torchs_choice_on_gpu():
    assert cpu_threads.default_num_threads("cpu") == cpu_threads.available_cpus() >= 1
    assert cpu_threads.default_num_threads("cuda") is None


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_thread_count_names_the_variable(value):
    with pytest.raises(ValueError, match="ENGINE_CPU_THREADS"):
        envs.get({"ENGINE_CPU_THREADS": value}, "ENGINE_CPU_THREADS")


def test_configure_sets_torch_threads_on_cpu(restore_threads):
    torch.set_num_threads(2)
    assert cpu_threads.configure_engine_process(1) == 1
    assert torch.get_num_threads() == 1


def test_gpu_engine_keeps_torch_threads_unless_asked(restore_threads):
    torch.set_num_threads(1)
    assert cpu_threads.configure_engine_process(None, device_type="cuda") == 1
    assert cpu_threads.configure_engine_process(2, device_type="cuda") == 2


# mallopt exists only in glibc (CI and the container are glibc; musl or macOS have no such call).
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_thresholds_are_accepted_by_glibc():
    assert cpu_threads.keep_freed_memory_mapped()
