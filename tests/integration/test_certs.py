"""Bring your own certificate (issue 17, item 3): `run` serves a PFX exported as Windows
exports it, with its password in a file and its intermediate, and real clients (curl,
openssl s_client) verify the chain against the root alone.

    DMZPROXY=build/dmzproxy python3 -m unittest -v test_certs
"""

import os
import subprocess
import sys
import unittest

import harness as h

sys.path.insert(0, os.path.join(h.HERE, "..", "support"))
import byo_pki  # noqa: E402  (tests/support)


class ServesAPfx(unittest.TestCase):
    def setUp(self):
        self.lab = h.Lab(prefix="dmz-certs-")
        self.addCleanup(self.lab.close)
        self.pki = byo_pki.ByoPki(self.lab.path("pki"))
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.port = h.free_port(h.FE_EXTERNAL)
        cfg = h.instance_config(
            "front-end", "front-end",
            {"name": "web", "protocol": "https", "bind": ["%s:%d" % (h.FE_EXTERNAL, self.port)], "authentication": "none",
             "certificates": [{"names": ["mail.contoso.com", "autodiscover.contoso.com"], "cert": self.pki.pfx,
                               "password_file": self.pki.password_file}]},
            [{"name": "OWA", "paths": ["/owa"], "target": {"address": h.ORIGIN, "port": self.origin.port}}])
        self.proxy = self.lab.start_proxy("front-end", cfg, h.FE_EXTERNAL, self.port)

    def test_curl_verifies_the_pfx_chain_with_the_root_only(self):
        res = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", self.pki.root, "--interface", h.CLIENT,
             "--resolve", "mail.contoso.com:%d:%s" % (self.port, h.FE_EXTERNAL),
             "-o", "/dev/null", "-w", "%{http_code} %{ssl_verify_result}",
             "https://mail.contoso.com:%d/owa/" % self.port],
            capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(res.returncode, 0, res.stderr + self.lab.diagnostics())
        self.assertEqual(res.stdout, "200 0", res.stderr)

    def test_s_client_sees_leaf_and_intermediate(self):
        res = subprocess.run(
            ["openssl", "s_client", "-connect", "%s:%d" % (h.FE_EXTERNAL, self.port), "-servername", "autodiscover.contoso.com",
             "-CAfile", self.pki.root, "-verify_return_error", "-verify_hostname", "autodiscover.contoso.com", "-showcerts"],
            input="", capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(res.returncode, 0, res.stdout[-2000:] + res.stderr)
        self.assertIn("Verify return code: 0 (ok)", res.stdout)
        self.assertIn("Contoso Test Issuing CA", res.stdout)


if __name__ == "__main__":
    unittest.main()
