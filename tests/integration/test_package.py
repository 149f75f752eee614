"""The Debian package (issue 8): cpack builds it from the tested build; the test reads it
with dpkg-deb, unpacks it into a folder (nothing is installed on this machine), runs the
unpacked binary on the unpacked example configs, and checks the systemd units.

    DMZPROXY=build/dmzproxy python3 -m unittest -v test_package
"""

import glob
import os
import shutil
import subprocess
import tempfile
import unittest

import harness as h

BUILD = os.path.dirname(os.path.abspath(h.DMZPROXY))


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


class DebianPackage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="dmz-pkg-")
        r = run(["cpack", "-G", "DEB", "-B", cls.tmp, "--config", os.path.join(BUILD, "CPackConfig.cmake")], cwd=BUILD)
        debs = glob.glob(os.path.join(cls.tmp, "*.deb"))
        if r.returncode != 0 or len(debs) != 1:
            raise AssertionError("cpack failed (exit %d):\n%s\n%s" % (r.returncode, r.stdout[-3000:], r.stderr[-3000:]))
        cls.deb = debs[0]
        cls.root = os.path.join(cls.tmp, "root")
        subprocess.run(["dpkg-deb", "-x", cls.deb, cls.root], check=True, timeout=60)
        cls.control = os.path.join(cls.tmp, "control")
        subprocess.run(["dpkg-deb", "-e", cls.deb, cls.control], check=True, timeout=60)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def field(self, name):
        return run(["dpkg-deb", "-f", self.deb, name]).stdout.strip()

    def test_metadata_and_dependencies(self):
        self.assertEqual(self.field("Package"), "dmzproxy")
        self.assertRegex(self.field("Version"), r"^\d+\.\d+\.\d+")
        depends = self.field("Depends")
        for lib in ("libssl3", "libc6", "adduser"):
            self.assertIn(lib, depends, "dpkg-shlibdeps must have found the shared libraries")

    def test_contents(self):
        listing = run(["dpkg-deb", "-c", self.deb]).stdout
        for path in ("./usr/bin/dmzproxy", "./usr/lib/systemd/system/dmzproxy-front-end.service",
                     "./usr/lib/systemd/system/dmzproxy-back-end.service",
                     "./usr/share/doc/dmzproxy/examples/front-end.toml", "./usr/share/doc/dmzproxy/examples/back-end.toml",
                     "./usr/share/doc/dmzproxy/README.md", "./etc/logrotate.d/dmzproxy"):
            self.assertIn(path, listing)
        with open(os.path.join(self.control, "conffiles")) as f:
            self.assertIn("/etc/logrotate.d/dmzproxy", f.read())
        self.assertTrue(os.access(os.path.join(self.control, "postinst"), os.X_OK))

    def test_unpacked_binary_checks_the_example_configs(self):
        binary = os.path.join(self.root, "usr", "bin", "dmzproxy")
        r = run([binary, "--version"])
        self.assertEqual(r.returncode, 0, r.stderr)
        etc = os.path.join(self.tmp, "etc-dmzproxy")
        os.makedirs(os.path.join(etc, "certs"))
        for tier in ("front-end", "back-end"):
            shutil.copy(os.path.join(self.root, "usr", "share", "doc", "dmzproxy", "examples", tier + ".toml"), etc)
        key, crt = os.path.join(etc, "certs", "mail.contoso.com.key"), os.path.join(etc, "certs", "mail.contoso.com.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "365",
                        "-addext", "subjectAltName=DNS:mail.contoso.com,DNS:autodiscover.contoso.com",
                        "-subj", "/CN=mail.contoso.com", "-keyout", key, "-out", crt], check=True, capture_output=True, timeout=60)
        shutil.copy(crt, os.path.join(etc, "certs", "internal-ca.pem"))
        for tier in ("front-end", "back-end"):
            r = run([binary, "check", "-c", os.path.join(etc, tier + ".toml")])
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("0 errors, 0 warnings", r.stdout + r.stderr)

    def test_units(self):
        for tier in ("front-end", "back-end"):
            path = os.path.join(self.root, "usr", "lib", "systemd", "system", "dmzproxy-%s.service" % tier)
            with open(path) as f:
                unit = f.read()
            self.assertIn("ExecStart=/usr/bin/dmzproxy run -c /etc/dmzproxy/%s.toml" % tier, unit)
            self.assertIn("ExecReload=/bin/kill -HUP $MAINPID", unit)
            self.assertIn("KillSignal=SIGTERM", unit)
            self.assertIn("--access-log /var/log/dmzproxy/%s.access.jsonl" % tier, unit)
            # Verified against this machine's systemd; /usr/bin/dmzproxy is not installed
            # here (the package is only unpacked), so that one complaint is expected.
            r = run(["systemd-analyze", "verify", path])
            problems = [line for line in (r.stdout + r.stderr).splitlines()
                        if "dmzproxy-%s.service" % tier in line and "/usr/bin/dmzproxy is not executable" not in line]
            self.assertEqual(problems, [], r.stdout + r.stderr)
        with open(os.path.join(self.root, "etc", "logrotate.d", "dmzproxy")) as f:
            rotate = f.read()
        self.assertIn("/var/log/dmzproxy/*.jsonl", rotate)
        self.assertIn("--signal=USR1", rotate)


if __name__ == "__main__":
    unittest.main()
