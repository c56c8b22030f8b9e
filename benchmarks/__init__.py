"""On-demand benchmarks (not part of ``make test``): ``python -m benchmarks.serve``.

- :mod:`benchmarks.peer`: a fast OTA device peer (plain asyncio, a separate process) that asks for
  the image window after window as fast as the socket allows and verifies every byte;
- :mod:`benchmarks.serve`: the app side, the daemon's own serving path
  (:class:`~netota_daemon.protocols.ota_stream.OtaStreamProtocol` over one shared
  :func:`~netota_daemon.firmware.open_image` buffer), instrumented, and the report.
"""
