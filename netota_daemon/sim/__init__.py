"""The simulated device: main firmware (CTP, HTTP, OTA phase 1) and the phase-2 loader, with faults.

Entry points: :class:`netota_daemon.sim.device.SimulatedDevice` with
:class:`netota_daemon.sim.config.SimConfig`; test images from :func:`netota_daemon.sim.image.make_image`.
The simulator shares nothing with the app side beyond :mod:`netota_daemon.wire`.
"""
