"""The reference math and the data it works on: ops (each op the equation in its docstring), checks (the
ops' argument checks), functional (the ops as models call them: the one place that picks the speed
layer's kernel or the reference op), nn (Module, Param, from_pretrained), random (torch-compatible
noise), noise (the web UIs' noise options), record (the recording hook), images (PIL <-> arrays, latent
scaling), pnginfo (settings read back from a web UI's image, checkpoint hashes), control_images (the
ControlNet preprocessors).

May import: refldm.backend, refldm.checkpoints (nn reads weights), refldm.errors, refldm.files, and
refldm.accel only in functional (the dispatch to the speed layer) and random (the C library's float32
math). ops never imports refldm.accel. Never models, schedulers, pipelines or anything above.
"""
