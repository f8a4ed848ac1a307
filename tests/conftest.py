import os

from hypothesis import HealthCheck, settings

# "ci" keeps the whole suite inside CI's budget on 2 cores; "deep" explores many more programs on demand:
#   HYPOTHESIS_PROFILE=deep pytest tests
settings.register_profile("ci", max_examples=80, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Inductor's CPU precompiled header lives in one shared /tmp path; concurrent compiling processes on one machine
# were seen deleting it under each other (CppCompileError "...precompiled_headers/*.h: No such file").
import torch._inductor.config as _inductor_config  # noqa: E402

_inductor_config.cpp_cache_precompile_headers = False
