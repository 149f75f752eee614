"""Each lab fault scenario (topology/scenarios/lab/*.toml) started for real with
`dmzproxy lab up --scenario NAME`, then `dmzproxy diagnose --json` must name the right
class and the right hop or tier (issue 5, item 5).

Run from ctest (integration_scenarios), or by hand:
    DMZPROXY=build/dmzproxy DMZ_SOURCE_DIR=. python3 -m unittest -v test_scenarios

Every lab here runs with `--shift SHIFT` (harness.SHIFT, this module's own), beside any other.
"""

import json
import os
import signal
import subprocess
import tempfile
import threading
import unittest

import harness as h

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("DMZ_SOURCE_DIR") or os.path.normpath(os.path.join(HERE, "..", ".."))
DMZPROXY = os.environ.get("DMZPROXY") or os.path.join(SOURCE_DIR, "build", "dmzproxy")
SCENARIOS = os.path.join(SOURCE_DIR, "topology", "scenarios", "lab")


def run(args, timeout=60):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


class Scenario(unittest.TestCase):
    scenario = None

    def setUp(self):
        self._dir = tempfile.TemporaryDirectory(prefix="dmz-scenario-")
        self.state = os.path.join(self._dir.name, "state")
        self.addCleanup(self._dir.cleanup)
        self.addCleanup(lambda: run([DMZPROXY, "lab", "--state", self.state, "down"], timeout=60))
        res = run([DMZPROXY, "lab", "--state", self.state, "up", "--detach", "--shift", str(h.SHIFT), "--scenario",
                   self.scenario], timeout=90)
        self.assertEqual(res.returncode, 0, "lab up --scenario %s failed:\n%s%s" % (self.scenario, res.stdout, res.stderr))
        self.up_output = res.stdout

    def diagnose(self, *args):
        res = run([DMZPROXY, "diagnose", "--state", self.state, "--json", *args], timeout=60)
        try:
            out = json.loads(res.stdout)
        except json.JSONDecodeError:
            self.fail("diagnose printed no JSON (exit %d):\n%s%s" % (res.returncode, res.stdout, res.stderr))
        return res.returncode, out


class HostHttpsDown(Scenario):
    scenario = "host-https-down"

    def test_lab_up_says_first_what_is_broken_on_purpose(self):
        first = self.up_output.splitlines()[:2]
        self.assertTrue(first and first[0].startswith("This topology is broken on purpose"), self.up_output[:600])
        self.assertRegex(first[1], r"host-https-down\.toml|back-end\.toml:\d+:\d+: error TOP006", self.up_output[:600])

    def test_network_fault_on_the_last_hop(self):
        code, d = self.diagnose("https://mail.contoso.com/owa/")
        self.assertEqual(code, 1)
        self.assertEqual(d["verdict"], "network-fault", d)
        self.assertEqual(d["hop"], "back-end -> exchange", d)
        self.assertIn("10061", d["reason"])
        tcp = {(h["from"], h["to"]): h["tcp"] for h in d["hops"]}
        self.assertEqual(tcp[("client", "front-end")], "ok")
        self.assertEqual(tcp[("front-end", "back-end")], "ok")

    def test_mail_still_flows(self):
        code, d = self.diagnose("smtp", "--rcpt", "demo@contoso.com")
        self.assertEqual((code, d["verdict"]), (0, "ok"), d)


class BackEndNotOnDmz(Scenario):
    scenario = "back-end-not-on-dmz"

    def test_network_fault_between_the_tiers(self):
        code, d = self.diagnose("https://mail.contoso.com/owa/")
        self.assertEqual(code, 1)
        self.assertEqual(d["verdict"], "network-fault", d)
        self.assertEqual(d["hop"], "front-end -> back-end", d)
        self.assertIn("refused", d["reason"])


class HostCertificateLacksName(Scenario):
    scenario = "host-certificate-lacks-name"

    def test_tls_name_mismatch_on_the_last_hop(self):
        code, d = self.diagnose("https://mail.contoso.com/owa/")
        self.assertEqual(code, 1)
        self.assertEqual(d["verdict"], "network-fault", d)
        self.assertEqual(d["hop"], "back-end -> exchange", d)
        self.assertIn("name mismatch", d["reason"])
        last = d["hops"][-1]
        self.assertEqual(last["tcp"], "ok")
        self.assertIn("ex01.corp.contoso.com", last["certificate_names"])


class FrontEndDeniesActiveSync(Scenario):
    scenario = "front-end-denies-activesync"

    def test_rule_fault_at_the_front_end_naming_the_rule(self):
        code, d = self.diagnose("-X", "OPTIONS", "https://mail.contoso.com/Microsoft-Server-ActiveSync")
        self.assertEqual(code, 1)
        self.assertEqual(d["verdict"], "rule-fault", d)
        self.assertEqual(d["tier"], "front-end", d)
        self.assertIn("Block ActiveSync", d["reason"])
        self.assertIn("even with the test rules", d["test_rules"])

    def test_owa_is_unaffected(self):
        code, d = self.diagnose("https://mail.contoso.com/owa/")
        self.assertEqual((code, d["verdict"]), (0, "ok"), d)


class OnlyTestRuleAllows(Scenario):
    scenario = "only-test-rule-allows"

    def test_rule_fault_that_the_test_rule_would_lift(self):
        code, d = self.diagnose("https://mail.contoso.com/ecp/")
        self.assertEqual(code, 1)
        self.assertEqual(d["verdict"], "rule-fault", d)
        self.assertEqual(d["tier"], "front-end", d)
        self.assertIn("would reach 'exchange'", d["test_rules"])

    def test_published_service_is_ok(self):
        code, d = self.diagnose("https://mail.contoso.com/owa/")
        self.assertEqual((code, d["verdict"]), (0, "ok"), d)
        self.assertEqual(len(d["hops"]), 3)


class OpenRelay(Scenario):
    scenario = "open-relay"

    def test_both_tiers_pass_the_relay_and_exchange_refuses_it(self):
        code, d = self.diagnose("smtp", "--rcpt", "victim@fabrikam.com")
        self.assertEqual(code, 1)
        self.assertEqual(d["verdict"], "rule-fault", d)
        self.assertEqual(d["tier"], "exchange", d)
        self.assertIn("5.7.54", d["response"])
        # Neither a test-rule hint nor a "another version of the file" note: the file agrees.
        self.assertIn("every tier let this probe through", d["test_rules"], d)
        self.assertNotIn("would reach", d["test_rules"], d)
        self.assertEqual(d.get("note", ""), "", d)

    def test_check_reports_the_open_relay(self):
        res = run([DMZPROXY, "check", "-q", "--json", "-t", os.path.join(SCENARIOS, "open-relay.toml")])
        self.assertEqual(res.returncode, 1)
        codes = [f["code"] for f in json.loads(res.stdout)["findings"]]
        self.assertEqual(codes.count("SMTP001"), 2, codes)


if __name__ == "__main__":
    unittest.main()


def status_json(state, user_args=()):
    res = run([*user_args, DMZPROXY, "lab", "--state", state, "status", "--json"], timeout=30)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {}


def pid_gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class Foreground(unittest.TestCase):
    """lab up without --detach: a live log line per request naming tier and rule; Ctrl-C
    (SIGINT) stops every process the lab started."""

    def test_live_log_then_ctrl_c_stops_everything(self):
        d = tempfile.TemporaryDirectory(prefix="dmz-fg-")
        self.addCleanup(d.cleanup)
        state = os.path.join(d.name, "state")
        self.addCleanup(lambda: run([DMZPROXY, "lab", "--state", state, "down"], timeout=60))
        proc = subprocess.Popen([DMZPROXY, "lab", "--state", state, "up", "--shift", str(h.SHIFT)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(proc.stdout.close)
        lines = []
        reader = threading.Thread(target=lambda: [lines.append(l) for l in proc.stdout], daemon=True)
        reader.start()
        st = h.wait_for(lambda: proc.poll() is None and status_json(state).get("running") and status_json(state), 60,
                        interval=0.2)
        self.assertTrue(st, "lab did not come up:\n" + "".join(lines))
        fe = next(i for i in st["instances"] if i["role"] == "front-end")
        web = next(l for l in fe["listeners"] if l["protocol"] == "https" and l["network"] == "External")
        client = next(n for n in st["networks"] if n["name"] == "External")["client_address"]
        url = "https://mail.contoso.com:%d/owa/" % web["port"]
        res = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", st["ca_file"], "--interface",
                   client, "--resolve", "mail.contoso.com:%d:%s" % (web["port"], web["address"]), url])
        self.assertEqual(res.stdout, "200", res.stderr)

        def logged(tier):
            return any("[%s]" % tier in l and "/owa/" in l and "Exchange/owa" in l for l in list(lines))
        self.assertTrue(h.wait_for(lambda: logged("front-end") and logged("back-end"), 30),
                        "no live log line for the request at each tier:\n" + "".join(lines))
        pids = [n["pid"] for n in st["instances"] + st["hosts"]]
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=60), 0, "".join(lines))
        for pid in pids:
            self.assertTrue(pid_gone(pid), "pid %d still runs after Ctrl-C" % pid)
        self.assertFalse(os.path.exists(os.path.join(state, "lab.json")))


@unittest.skipUnless(os.geteuid() == 0 and os.path.exists("/usr/bin/setpriv"), "needs root to become nobody")
class WithoutRoot(unittest.TestCase):
    """The lab runs without privileges: ports below 1024 move to 10000 + P, and status says so."""

    def test_lab_as_nobody_maps_ports_and_works(self):
        d = tempfile.mkdtemp(prefix="dmz-nobody-")
        os.chmod(d, 0o777)
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", d], check=False))
        state = os.path.join(d, "state")
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
        self.addCleanup(lambda: run([*as_nobody, DMZPROXY, "lab", "--state", state, "down"], timeout=60))
        up = run([*as_nobody, DMZPROXY, "lab", "--state", state, "up", "--detach", "--shift", str(h.SHIFT)], timeout=90)
        self.assertEqual(up.returncode, 0, up.stdout + up.stderr)
        self.assertIn("10000 + P", up.stdout)
        st = status_json(state, as_nobody)
        self.assertTrue(st.get("ports_mapped"), st)
        ports = sorted(l["port"] for i in st["instances"] for l in i["listeners"])
        self.assertIn(10443, ports)
        self.assertIn(10025, ports)
        res = run([*as_nobody, DMZPROXY, "diagnose", "--state", state, "--json", "https://mail.contoso.com/owa/"])
        self.assertEqual(json.loads(res.stdout)["verdict"], "ok", res.stdout)
