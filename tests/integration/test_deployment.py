"""diagnose on a deployment that `dmzproxy run` started, not `lab up`.

The default two-tier topology is copied with this module's addresses, and each instance's
config names an admin endpoint with a bearer token. The Exchange host and both tiers are
started by hand, the way an admin starts them on real machines; there is no lab.json.
`diagnose -t TOPOLOGY` then asks each tier, through its admin endpoint (POST /probe), to
probe its own next hop from its own source address, and names the hop and the fault class.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import unittest

from harness import (DMZPROXY, HERE, Lab, free_port, lab_address, port_accepts, wait_for)

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
TOPOLOGY_DIR = os.path.join(REPO, "topology")
HOST_PROGRAM = os.path.join(TOPOLOGY_DIR, "hosts", "exchange_host.py")

CLIENT = lab_address("127.10.0.100")
FE = lab_address("127.10.0.10")
BE_INTERNAL = lab_address("127.30.0.20")
EXCHANGE = lab_address("127.30.0.50")


def shifted(text):
    """The topology text with every lab address moved to this module's block."""
    return re.sub(r"127\.(10|20|30)\.(\d+)\.(\d+)", lambda m: lab_address(m.group(0)), text)


@unittest.skipUnless(os.geteuid() == 0, "binds the real ports 443 and 25, which needs root")
class DeploymentDiagnose(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.lab = Lab("dmz-it-deploy-")
        try:
            cls._start()
        except BaseException:
            sys.stderr.write(cls.lab.diagnostics() + "\n")
            cls.lab.close()
            raise

    @classmethod
    def _start(cls):
        lab = cls.lab
        cls.state = lab.path("state")
        os.makedirs(os.path.join(lab.dir, "exchange-two-tier"))
        with open(os.path.join(TOPOLOGY_DIR, "exchange-two-tier.toml"), encoding="utf-8") as f:
            cls.topology = lab.write("deployment.toml", shifted(f.read()))
        cls.admin, cls.token_file = {}, {}
        for name in ("front-end", "back-end"):
            port = free_port("127.0.0.1")
            cls.admin[name] = "http://127.0.0.1:%d" % port
            cls.token_file[name] = lab.write(name + ".token", "%s-admin-token-0123456789\n" % name)
            with open(os.path.join(TOPOLOGY_DIR, "exchange-two-tier", name + ".toml"), encoding="utf-8") as f:
                text = shifted(f.read())
            text = text.replace("[instance]\n", '[instance]\nadmin = "127.0.0.1:%d"\nadmin_token_file = "%s"\n'
                                % (port, cls.token_file[name]), 1)
            lab.write(os.path.join("exchange-two-tier", name + ".toml"), text)
        # The Exchange host's certificate from the same CA the tiers' lab-issued ones come from.
        subprocess.run([DMZPROXY, "certs", "--state", cls.state, "issue", "mail.contoso.com", "autodiscover.contoso.com",
                        "ex01.corp.contoso.com", "--out", "host-exchange"], check=True, capture_output=True, timeout=60)
        cls.ca = os.path.join(cls.state, "pki", "ca.pem")
        cls.start_exchange()
        for name, address in (("back-end", lab_address("127.20.0.20")), ("front-end", FE)):
            p = lab.start(name, [DMZPROXY, "run", "-t", cls.topology, "--instance", name, "--state", cls.state,
                                 "--threads", "1"], address, 443)
            p.wait_output(": ready, ")

    @classmethod
    def start_exchange(cls):
        argv = [sys.executable, HOST_PROGRAM, "--name", "exchange", "--address", EXCHANGE,
                "--cert", os.path.join(cls.state, "pki", "host-exchange.pem"),
                "--key", os.path.join(cls.state, "pki", "host-exchange.key"),
                "--store", cls.lab.path("mailstore"), "--stats", "127.0.0.1:%d" % free_port("127.0.0.1"),
                "--log", cls.lab.path("exchange.jsonl"), "--accepted-domain", "contoso.com",
                "--xclient-from", BE_INTERNAL, "--service", "web:https:443",
                "--service", "frontend-transport:smtp:25:frontend", "--service", "hub-transport:smtp:2525:hub"]
        cls.exchange = cls.lab.start("exchange-%d" % len(cls.lab.processes), argv, EXCHANGE, 443)
        wait_for(lambda: port_accepts(EXCHANGE, 25), 30)

    @classmethod
    def tearDownClass(cls):
        cls.lab.close()

    def diagnose(self, *args):
        # An empty state folder: no lab.json, so nothing comes from a lab.
        empty = self.lab.path("no-lab")
        os.makedirs(empty, exist_ok=True)
        argv = [DMZPROXY, "diagnose", "--state", empty, "-t", self.topology, "--ca-file", self.ca,
                "--from", CLIENT] + list(args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    def probe(self, instance, query, token=True, method="POST"):
        argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", method,
                "%s/probe?%s" % (self.admin[instance], query)]
        if token:
            with open(self.token_file[instance], encoding="utf-8") as f:
                argv[1:1] = ["-H", "Authorization: Bearer " + f.read().strip()]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body

    # -------------------------------------------------------------------------- verdicts

    def test_1_ok_through_both_tiers_each_hop_probed_by_its_tier(self):
        r = self.diagnose("--json", "https://mail.contoso.com/owa/")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        d = json.loads(r.stdout)
        self.assertEqual(d["verdict"], "ok")
        hops = {(h["from"], h["to"]): h for h in d["hops"]}
        fe_be = hops[("front-end", "back-end")]
        be_ex = hops[("back-end", "exchange")]
        self.assertEqual(fe_be["probed_by"], "front-end")
        self.assertEqual(be_ex["probed_by"], "back-end")
        # Each tier connected from its own leg: the source its running config uses.
        self.assertEqual(fe_be["source"], lab_address("127.20.0.10"))
        self.assertEqual(be_ex["source"], BE_INTERNAL)
        self.assertEqual((be_ex["tcp"], be_ex["tls"]), ("ok", "ok"))
        self.assertIn("ex01.corp.contoso.com", be_ex["certificate_names"])
        self.assertIsNone(hops[("client", "front-end")]["probed_by"])

    def test_2_smtp_ok(self):
        r = self.diagnose("smtp:demo@contoso.com")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("[probed by back-end]", r.stdout)
        self.assertRegex(r.stdout, r"(?m)^OK ")

    def test_3_rule_fault_named_at_the_front_end(self):
        r = self.diagnose("https://mail.contoso.com/ecp/")
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"(?m)^RULE FAULT at front-end ")

    def test_4_exchange_down_is_a_network_fault_at_the_back_ends_hop(self):
        type(self).exchange.stop()
        try:
            r = self.diagnose("https://mail.contoso.com/owa/")
            self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
            self.assertRegex(r.stdout, r"hop back-end -> exchange: %s -> %s:443  TCP connection refused \(10061\).*\[probed by back-end\]"
                             % (re.escape(BE_INTERNAL), re.escape(EXCHANGE)))
            self.assertRegex(r.stdout, r"(?m)^NETWORK FAULT at back-end -> exchange \(connection refused \(10061\)")
        finally:
            type(self).start_exchange()

    # ------------------------------------------------------------------ the probe endpoint

    def test_5_probe_needs_the_token(self):
        code, body = self.probe("back-end", "rule=Exchange%2Fowa", token=False)
        self.assertEqual(code, 401, body)
        code, body = self.probe("back-end", "rule=Exchange%2Fowa", method="GET")
        self.assertEqual(code, 405, body)

    def test_6_probe_only_a_configured_next_hop(self):
        code, body = self.probe("back-end", "rule=no-such-rule")
        self.assertEqual(code, 404, body)
        self.assertIn("Exchange/owa", json.loads(body)["rules"])
        code, body = self.probe("back-end", "address=%s&port=22" % EXCHANGE)
        self.assertEqual(code, 400, body)

    def test_7_probes_are_rate_limited(self):
        codes = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(codes) < 40:
            code, body = self.probe("front-end", "rule=Exchange%2Fowa")
            codes.append(code)
            if code == 429:
                self.assertIn("too many probes", body)
                break
        self.assertIn(429, codes, codes)
        self.assertTrue(all(c == 200 for c in codes[:-1]), codes)
        # Far fewer than forty: the budget is ten in a row plus one a second.
        self.assertLessEqual(len(codes), 25, codes)


if __name__ == "__main__":
    unittest.main()
