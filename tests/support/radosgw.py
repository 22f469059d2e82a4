"""A real S3 engine: Ceph RADOS Gateway (Debian's ``radosgw`` 16.2 Pacific) on a throwaway
single-node cluster: one ``ceph-mon``, one ``ceph-osd`` on ``memstore`` (objects in RAM,
nothing on disk but logs and the monitor's store), one ``radosgw``; no ``ceph-mgr``.

Pacific's gateway has no standalone (dbstore) backend, hence the cluster. Everything lives
under the work dir (run dir, sockets, logs, crash dumps, the cluster log that otherwise
goes to /var/log/ceph); the monitor speaks msgr2 only, on loopback. Settings that matter:

* ``auth ... required = none`` and ``ms mon client mode = crc``: without the latter the
  gateway hangs in its first monitor session (auth error -13).
* one replica: ``osd pool default size = 1``, ``mon allow pool size one``, and
  ``osd crush chooseleaf type = 0`` (place replicas across OSDs, not hosts).
* ``paxos propose interval = 0.05``: creating the S3 user takes 0.5 s instead of 9 s.

Quirks seen (tests rely on them being handled, not on them): ``If-None-Match`` is honoured
on PutObject but NOT on CompleteMultipartUpload; CompleteMultipartUpload answers an empty
ETag. Reference: https://docs.ceph.com/en/pacific/radosgw/ and .../rados/configuration/
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from tests.support.procs import CommandError, free_port, http_status, run, start_daemon, wait_until
from tests.support.s3engine import S3Engine, S3Keys

START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
OSD_PORTS = 100  # the OSD binds four messenger addresses somewhere in its port range


def missing() -> str | None:
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return (f"Ceph is not installed ({', '.join(absent)} missing): "
                "apt-get install radosgw ceph-mon ceph-osd ceph-common; .ci/run installs them")
    return None


class RadosGateway(S3Engine):
    name = "radosgw"

    def __init__(self, workdir: Path, keys: S3Keys | None = None) -> None:
        super().__init__(workdir, free_port(), keys)
        self.fsid = str(uuid.uuid4())
        self.mon_port = free_port()
        self.osd_port_min = random.randrange(20000, 60000 - OSD_PORTS)
        self.conf = workdir / "ceph.conf"
        self.logs = workdir / "log"

    def _config(self) -> str:
        d = self.workdir
        settings = {
            "fsid": self.fsid,
            "mon host": f"v2:127.0.0.1:{self.mon_port}",
            "mon initial members": "a",
            "public addr": "127.0.0.1",
            "ms bind msgr1": "false", "ms bind ipv6": "false",
            "ms bind port min": self.osd_port_min, "ms bind port max": self.osd_port_min + OSD_PORTS,
            "auth cluster required": "none", "auth service required": "none", "auth client required": "none",
            "ms mon client mode": "crc",
            "run dir": d / "run", "admin socket": d / "run/$name.asok", "pid file": d / "run/$name.pid",
            "log file": d / "log/$name.log", "crash dir": d / "crash", "keyring": d / "keyring",
            "mon cluster log to file": "false", "mon cluster log file": d / "log/$cluster.$channel.log",
            "mon data": d / "mon/$name", "osd data": d / "osd/$name", "rgw data": d / "rgw",
            "osd objectstore": "memstore", "memstore device bytes": 4 << 30,
            "osd pool default size": 1, "osd pool default min size": 1,
            "osd pool default pg num": 8, "osd pool default pgp num": 8,
            "osd pool default pg autoscale mode": "off",
            "osd crush chooseleaf type": 0, "mon allow pool size one": "true",
            "mon warn on pool no redundancy": "false",
            # The monitor refuses to start (exit 28, ENOSPC) when its disk is over 95 % full —
            # seen on a CI machine whose /tmp held old benchmark runs; its store is tiny.
            "mon data avail crit": 0, "mon data avail warn": 0,
            "paxos propose interval": 0.05,
        }  # fmt: skip
        return "[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _ceph(self, *args: str) -> str:
        return run(["ceph", "-c", str(self.conf), "--connect-timeout", "10", *args], timeout=COMMAND_TIMEOUT).stdout

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = self.logs / f"{name}.out"
        proc = start_daemon(args, stdout=out, stderr=out)
        self._procs.append(proc)
        return proc

    def start(self) -> RadosGateway:
        if self.running:
            return self
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        began = time.monotonic()
        for sub in ("run", "log", "crash", "mon", "osd/osd.0", "rgw"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        try:
            self._start_mon()
            self._start_osd()
            self._start_gateway()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _start_mon(self) -> None:
        monmap = self.workdir / "monmap"
        run(["monmaptool", "-c", str(self.conf), "--create", "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]",
             "--fsid", self.fsid, str(monmap)], timeout=COMMAND_TIMEOUT)
        run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap)], timeout=COMMAND_TIMEOUT)
        proc = self._start("mon.a", ["ceph-mon", "-c", str(self.conf), "-i", "a", "-f"])
        # The monitor may take longer than one client's connect timeout to answer (seen on
        # a busy CI machine: the first command timed out with nothing in the mon's log yet).
        wait_until(self._mon_answers, timeout=START_TIMEOUT, what="ceph-mon", proc=proc, log=self.logs / "mon.a.log")

    def _mon_answers(self) -> bool:
        try:
            run(["ceph", "-c", str(self.conf), "--connect-timeout", "3", "mon", "stat"], timeout=10)
        except CommandError:
            return False
        return True

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).strip()
        run(["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid], timeout=COMMAND_TIMEOUT)
        proc = self._start(f"osd.{osd_id}", ["ceph-osd", "-c", str(self.conf), "-i", osd_id, "-f"])
        wait_until(self._osd_up, timeout=START_TIMEOUT, what="ceph-osd up", proc=proc,
                   log=self.logs / f"osd.{osd_id}.log")

    def _osd_up(self) -> bool:
        status = json.loads(self._ceph("osd", "stat", "--format", "json"))
        return bool(status.get("num_up_osds", 0) >= 1)

    def _start_gateway(self) -> None:
        proc = self._start("client.rgw.a", [
            "radosgw", "-c", str(self.conf), "-n", "client.rgw.a", "-f",
            "--rgw-frontends", f"beast endpoint=127.0.0.1:{self.port}",
        ])  # fmt: skip
        log = self.logs / "client.rgw.a.log"
        wait_until(lambda: http_status(self.endpoint, timeout=1.0) == 200, timeout=START_TIMEOUT,
                   what=f"radosgw on {self.port}", proc=proc, log=log)
        run(["radosgw-admin", "-c", str(self.conf), "user", "create", "--uid", "test", "--display-name", "test",
             "--access-key", self.keys.access_key, "--secret", self.keys.secret_key], timeout=COMMAND_TIMEOUT)
        wait_until(self._lists, timeout=START_TIMEOUT, what="radosgw user", proc=proc, log=log)

    def _lists(self) -> bool:
        try:
            self.client().list_buckets()
        except (BotoCoreError, ClientError):  # not ready yet; wait_until's deadline reports it
            return False
        return True

    def __enter__(self) -> RadosGateway:
        return self.start()
