"""Sensors of the endpoint agent and the one place that picks their implementations.

`build_sensors(config)` returns ready-to-start sensors; it does not start them.
"""

from __future__ import annotations

import logging

from agent.sensors.base import Emit, Sensor, SensorError, SensorUnavailable
from agent.sensors.config import SensorsConfig

logger = logging.getLogger(__name__)

__all__ = ["Emit", "Sensor", "SensorError", "SensorUnavailable", "SensorsConfig",
           "build_sensors"]


def build_sensors(config: SensorsConfig) -> list[Sensor]:
    """Pick one implementation per enabled sensor.

    Process: the netlink proc connector when it can bind (root/CAP_NET_ADMIN), else psutil
    polling; `mode` on the returned sensor says which is active.
    """
    from agent.sensors.file import FileSensor
    from agent.sensors.dns import DnsSensor
    from agent.sensors.network import NetworkSensor
    from agent.sensors.process_netlink import NetlinkProcessSensor
    from agent.sensors.process_psutil import PsutilProcessSensor

    sensors: list[Sensor] = []
    pc = config.process
    if pc.enabled and pc.mode != "off":
        proc: Sensor | None = None
        if pc.mode in ("auto", "netlink"):
            try:
                proc = NetlinkProcessSensor(pc)
            except SensorUnavailable as e:
                if pc.mode == "netlink":
                    raise
                logger.warning("process sensor: netlink unavailable (%s); using psutil", e.reason)
        if proc is None:
            proc = PsutilProcessSensor(pc)
        sensors.append(proc)
    if config.file.enabled:
        sensors.append(FileSensor(config.file))
    nc = config.network
    if nc.enabled and nc.flows:
        sensors.append(NetworkSensor(nc))
    if nc.enabled and nc.dns:
        try:
            sensors.append(DnsSensor(nc))
        except SensorUnavailable as e:  # no CAP_NET_RAW: flows still work, DNS does not
            logger.warning("dns sensor unavailable: %s", e.reason)
    return sensors
