"""The reference math and the data it works on: ops (each op the equation in its docstring), nn (Module,
Param, from_pretrained), random (torch-compatible noise), record (the recording hook), images (PIL <->
arrays, latent scaling, the PNG parameters text), pnginfo (settings read back from a web UI's image,
checkpoint hashes).

May import: refldm.backend, refldm.checkpoints (nn reads weights), refldm.errors, refldm.files, and
refldm.accel only where the reference hands work to the speed layer (ops' dispatch lines) or binds the C
library (random). Never models, schedulers, pipelines or anything above.
"""
