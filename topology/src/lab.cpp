#include "dmz/topology/lab.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "dmz/certs/certs.hpp"
#include "dmz/topology/topology.hpp"

namespace dmz::topology {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// ---- privileges and ports ----------------------------------------------------------------

/// Whether this process may bind ports below 1024: root, CAP_NET_BIND_SERVICE, or a
/// lowered net.ipv4.ip_unprivileged_port_start.
bool may_bind_privileged() {
    if (geteuid() == 0) return true;
    std::ifstream st("/proc/self/status");
    std::string line;
    while (std::getline(st, line))
        if (line.rfind("CapEff:", 0) == 0) {
            auto caps = std::stoull(line.substr(7), nullptr, 16);
            if (caps & (1ULL << 10)) return true;
        }
    std::ifstream start("/proc/sys/net/ipv4/ip_unprivileged_port_start");
    int first = 1024;
    if (start >> first && first <= 25) return true;
    return false;
}

/// The process holding a listening socket on addr:port, from /proc, or "".
std::string holder_of(const std::string& addr, std::uint16_t port) {
    in_addr a{};
    if (inet_pton(AF_INET, addr.c_str(), &a) != 1) return "";
    char want[32];
    std::snprintf(want, sizeof want, "%08X:%04X", a.s_addr, port);
    std::ifstream tcp("/proc/net/tcp");
    std::string line, inode;
    std::getline(tcp, line);
    while (std::getline(tcp, line)) {
        std::istringstream ss(line);
        std::string sl, local, remote, state, txrx, tr, retr, uid, timeout, ino;
        ss >> sl >> local >> remote >> state >> txrx >> tr >> retr >> uid >> timeout >> ino;
        if (state == "0A" && (local == want || local == std::string("00000000:") + std::string(want).substr(9))) inode = ino;
    }
    if (inode.empty()) return "";
    auto target = "socket:[" + inode + "]";
    for (auto& p : fs::directory_iterator("/proc", fs::directory_options::skip_permission_denied)) {
        auto pid = p.path().filename().string();
        if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
        std::error_code ec;
        for (auto& fd : fs::directory_iterator(p.path() / "fd", fs::directory_options::skip_permission_denied, ec)) {
            std::error_code ec2;
            if (fs::read_symlink(fd.path(), ec2).string() == target) {
                std::ifstream cmd(p.path() / "cmdline");
                std::string c;
                std::getline(cmd, c, '\0');
                return "pid " + pid + " (" + c + ")";
            }
        }
    }
    return "another process";
}

/// Fails with a clear message when addr:port cannot be bound.
void preflight(const std::string& what, const std::string& addr, std::uint16_t port) {
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, addr.c_str(), &sa.sin_addr);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    int r = ::bind(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
    int err = errno;
    ::close(s);
    if (r == 0) return;
    std::string msg = what + ": cannot bind " + addr + ":" + std::to_string(port) + ": " + std::strerror(err);
    if (err == EADDRINUSE) {
        auto h = holder_of(addr, port);
        msg += h.empty() ? " (held by another process)" : " (held by " + h + ")";
    }
    if (err == EACCES) msg += " (ports below 1024 need root or CAP_NET_BIND_SERVICE)";
    throw std::runtime_error(msg);
}

/// Something listens on addr:port (or on the wildcard address and that port). Read from the
/// kernel's socket table rather than by connecting: a connection would reach the proxy as a
/// session of its own, and the live log would show the lab's readiness probes.
bool listening(const std::string& addr, std::uint16_t port) {
    in_addr a{};
    if (inet_pton(AF_INET, addr.c_str(), &a) != 1) return false;
    char want[16], any[16];
    std::snprintf(want, sizeof want, "%08X:%04X", a.s_addr, port);  // the table prints the address as stored
    std::snprintf(any, sizeof any, "%08X:%04X", 0u, port);
    std::ifstream in("/proc/net/tcp");
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
        std::istringstream f(line);
        std::string slot, local, remote, state;
        if (!(f >> slot >> local >> remote >> state)) continue;
        if (state == "0A" && (local == want || local == any)) return true;  // 0A: LISTEN
    }
    return false;
}

std::uint16_t free_loopback_port() {
    int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(s, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
    socklen_t len = sizeof sa;
    getsockname(s, reinterpret_cast<sockaddr*>(&sa), &len);
    ::close(s);
    return ntohs(sa.sin_port);
}

// ---- processes ---------------------------------------------------------------------------

/// Starts argv with output to `log`, in its own process group (Ctrl-C reaches the lab,
/// which stops the children in order).
pid_t spawn(const std::vector<std::string>& argv, const std::string& log) {
    pid_t pid = fork();
    if (pid < 0) throw std::runtime_error(std::string("fork failed: ") + std::strerror(errno));
    if (pid == 0) {
        setpgid(0, 0);
        int in = ::open("/dev/null", O_RDONLY);
        int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (in >= 0) dup2(in, 0);
        if (out >= 0) {
            dup2(out, 1);
            dup2(out, 2);
        }
        std::vector<char*> args;
        for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        execvp(args[0], args.data());
        std::fprintf(stderr, "cannot start %s: %s\n", args[0], std::strerror(errno));
        _exit(127);
    }
    return pid;
}

bool alive(pid_t pid) {
    if (pid <= 0) return false;
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) return false;  // our child, now reaped
    if (::kill(pid, 0) != 0) return false;
    // An exited process not yet reaped by its parent (lab down runs in another process)
    // is a zombie: gone for our purposes.
    std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
    std::string line;
    std::getline(stat, line);
    auto close = line.rfind(')');
    return !(close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z');
}

void stop_pids(const std::vector<pid_t>& pids) {
    for (auto p : pids)
        if (p > 0) ::kill(p, SIGTERM);
    // An instance drains for up to 10 s (requests in flight finish); then it is killed.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(12);
    while (std::chrono::steady_clock::now() < deadline) {
        bool any = false;
        for (auto p : pids) any = any || alive(p);
        if (!any) return;
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    for (auto p : pids)
        if (alive(p)) ::kill(p, SIGKILL);
}

std::string tail_file(const std::string& path, std::size_t max = 1500) {
    std::ifstream f(path, std::ios::binary);
    std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return s.size() > max ? s.substr(s.size() - max) : s;
}

std::string random_password() {
    static constexpr char alphabet[] = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    std::random_device rd;
    std::string out;
    for (int i = 0; i < 16; ++i) out.push_back(alphabet[rd() % (sizeof alphabet - 1)]);
    return out;
}

volatile std::sig_atomic_t g_stop = 0;
void on_signal(int) { g_stop = 1; }

/// One line per access-log entry of any tier, as it happens.
void print_log_line(const std::string& line) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_discarded()) return;
    auto str = [&](const char* k) { return j.contains(k) && j[k].is_string() ? j[k].get<std::string>() : std::string(); };
    std::ostringstream o;
    o << "[" << str("instance") << "] ";
    if (str("protocol") == "smtp") {
        o << "SMTP " << str("original_client") << " <" << str("mail_from") << "> -> ";
        for (auto& r : j.value("rcpt_accepted", json::array())) o << r.get<std::string>() << " ";
        for (auto& r : j.value("rcpt_refused", json::array())) o << "!" << r.value("rcpt", "") << " ";
        o << "| " << (str("upstream_reply").empty() ? str("detail") : str("upstream_reply"));
    } else {
        o << str("original_client") << " " << str("method") << " " << str("host") << str("path") << " -> "
          << j.value("status", 0);
    }
    o << " | rule " << (str("rule").empty() ? "-" : str("rule"));
    if (!str("fault").empty()) o << " | " << str("fault") << ": " << str("detail");
    std::cout << o.str() << std::endl;
}

/// A scenario broken on purpose says so before anything else.
void print_on_purpose(const topology& t, const diagnostics& found) {
    bool any = false;
    for (auto& d : found) {
        if (!t.on_purpose(d)) continue;
        if (!any) std::cout << "This topology is broken on purpose (broken_on_purpose in " << t.file << "); it starts anyway:\n";
        any = true;
        std::cout << "  " << d.where.to_string() << ": error " << d.code << ": " << d.message << "\n";
        if (!d.hint.empty()) std::cout << "    hint: " << d.hint << "\n";
    }
    if (any) std::cout << std::endl;
}

}  // namespace

int lab_up(const lab_options& o) {
    // 1. The topology, as it will run here.
    bool map = !may_bind_privileged();
    load_settings settings{o.state, map, o.shift};
    auto res = load(o.topology, settings);
    if (res.topo && !rules::has_errors(res.diags)) lint(*res.topo, res.diags);
    if (!res.topo || !blocking(*res.topo, res.diags).empty()) {
        // Addresses a shift pushes out of 127.0.0.0/8 leave follow-on errors: name those alone.
        auto by_shift = [](const rules::diagnostic& d) {
            return d.message.rfind("a shift of ", 0) == 0;
        };
        bool shift_fault = std::any_of(res.diags.begin(), res.diags.end(), by_shift);
        std::ostringstream msg;
        for (auto& d : res.diags)
            if (d.level == rules::severity::error && (!res.topo || !res.topo->on_purpose(d)) && (!shift_fault || by_shift(d)))
                msg << "\n  " << d.where.to_string() << ": " << d.code << ": " << d.message;
        throw std::runtime_error(
            (shift_fault ? "--shift " + std::to_string(o.shift) + " does not fit this topology"
                         : "the topology has errors; run 'dmzproxy check -t " + o.topology + "'") +
            msg.str());
    }
    auto& t = *res.topo;
    print_on_purpose(t, res.diags);
    if (fs::exists(o.state + "/lab.json")) {
        auto st = json::parse(std::ifstream(o.state + "/lab.json"), nullptr, false);
        bool running = false;
        if (!st.is_discarded())
            for (auto& p : st.value("pids", json::array())) running = running || alive(p.get<int>());
        if (running) throw std::runtime_error("a lab is already running from " + o.state + " (dmzproxy lab down, or lab status)");
    }
    if (!fs::exists(o.hosts_program))
        throw std::runtime_error("the simulated Exchange host '" + o.hosts_program + "' is missing");
    fs::create_directories(o.state + "/logs");
    if (map)
        std::cout << "No privilege to bind ports below 1024: each such port P runs on 10000 + P (443 -> 10443, 25 -> 10025, 80 -> 10080).\n";
    if (o.shift)
        std::cout << "Shifted " << o.shift
                  << " /16 blocks up: every address 127.B.x.y of the topology runs on 127.(B + "
                  << o.shift << ").x.y.\n";

    // 2. Certificates: the lab CA, each listener's, each host's.
    auto pki = o.state + "/pki";
    auto ca = certs::open_or_make_ca(pki);
    for (auto& in : t.instances)
        if (in.policy)
            for (auto& l : in.policy->config().listeners)
                for (auto& c : l.certificates)
                    if (c.lab) certs::issue_leaf(ca, c.names, pki, in.name + "-" + l.name);
    for (auto& h : t.hosts)
        if (!h.names.empty()) certs::issue_leaf(ca, h.names, pki, "host-" + h.name);

    // 3. Every endpoint must be free before anything starts.
    struct endpoint {
        std::string owner, name, protocol, address;
        std::uint16_t port;
        bool host = false;  ///< a simulated host's service (probed before any instance)
    };
    std::vector<endpoint> endpoints;
    for (auto& in : t.instances)
        if (in.policy)
            for (auto& l : in.policy->config().listeners)
                for (auto& b : l.bind) endpoints.push_back({in.name, l.name, rules::to_string(l.proto), b.address.to_string(), b.port});
    for (auto& h : t.hosts)
        for (auto& s : h.services) endpoints.push_back({h.name, s.name, rules::to_string(s.proto), h.address.to_string(), s.port, true});
    for (auto& e : endpoints) preflight(e.owner + " " + e.name, e.address, e.port);

    // 4. The demo user, in every instance's user store (pre-authentication, SMTP AUTH); the
    //    simulated host accepts it for NTLM and Basic too. A new password every `lab up`.
    json users = json::array({{{"name", "demo"}, {"password", random_password()}, {"groups", {"mail-users"}}, {"note", "lab only"}}});
    if (o.set_user) {
        std::vector<std::string> stores;
        for (auto& in : t.instances)
            if (in.policy && !in.policy->config().user_store.empty() &&
                std::find(stores.begin(), stores.end(), in.policy->config().user_store) == stores.end())
                stores.push_back(in.policy->config().user_store);
        for (auto& s : stores) o.set_user(s, "demo", users[0]["password"].get<std::string>(), {"mail-users"});
    }

    // 5. Start hosts, then instances back to front.
    std::vector<pid_t> pids;
    json hosts = json::array(), instances = json::array();
    auto fail = [&](const std::string& why) {
        stop_pids(pids);
        throw std::runtime_error(why);
    };
    for (auto& h : t.hosts) {
        auto stats_port = free_loopback_port();
        std::vector<std::string> argv{"python3", o.hosts_program, "--name", h.name, "--address", h.address.to_string(),
                                      "--cert", pki + "/host-" + h.name + ".pem", "--key", pki + "/host-" + h.name + ".key",
                                      "--store", o.state + "/hosts/" + h.name, "--stats", "127.0.0.1:" + std::to_string(stats_port),
                                      "--log", o.state + "/logs/host-" + h.name + ".jsonl"};
        for (auto& d : h.accepted_domains) argv.insert(argv.end(), {"--accepted-domain", d});
        for (auto& x : h.xclient_from) {
            auto* in = t.find_instance(x);
            auto a = in ? in->address_on(h.network) : std::nullopt;
            if (!a) fail("host '" + h.name + "': xclient_from names '" + x + "', which is no instance with a leg on " + h.network);
            argv.insert(argv.end(), {"--xclient-from", a->to_string()});
        }
        json services = json::array();
        for (auto& s : h.services) {
            argv.insert(argv.end(), {"--service", s.name + ":" + rules::to_string(s.proto) + ":" + std::to_string(s.port) +
                                                      (s.role.empty() ? "" : ":" + s.role)});
            services.push_back({{"name", s.name}, {"protocol", rules::to_string(s.proto)}, {"address", h.address.to_string()}, {"port", s.port}});
        }
        fs::create_directories(o.state + "/hosts/" + h.name);
        auto pid = spawn(argv, o.state + "/logs/host-" + h.name + ".out");
        pids.push_back(pid);
        hosts.push_back({{"name", h.name}, {"pid", pid}, {"network", h.network}, {"services", services},
                         {"stats", "http://127.0.0.1:" + std::to_string(stats_port) + "/stats"}, {"mail_store", o.state + "/hosts/" + h.name}});
    }
    std::vector<const instance*> order;
    for (auto& in : t.instances) order.push_back(&in);
    std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->role == "back-end" && b->role != "back-end"; });
    for (auto* in : order) {
        // Each instance's admin endpoint on a free loopback port (lab status and lab reload use it).
        auto admin = "127.0.0.1:" + std::to_string(free_loopback_port());
        std::vector<std::string> argv{o.dmzproxy, "run", "-t", o.topology, "--instance", in->name, "--state", o.state,
                                      "--threads", "1", "--access-log", o.state + "/logs/" + in->name + ".jsonl",
                                      "--admin", admin};
        if (map) argv.push_back("--map-ports");
        if (o.shift)
            argv.insert(argv.end(), {"--shift", std::to_string(o.shift)});
        auto pid = spawn(argv, o.state + "/logs/" + in->name + ".out");
        pids.push_back(pid);
        json listeners = json::array();
        for (auto& l : in->policy->config().listeners) {
            std::vector<std::string> names;
            for (auto& c : l.certificates)
                for (auto& n : c.names) names.push_back(n);
            if (!l.public_name.empty()) names.push_back(l.public_name);
            for (auto& b : l.bind)
                listeners.push_back({{"name", l.name}, {"protocol", rules::to_string(l.proto)}, {"address", b.address.to_string()},
                                     {"port", b.port}, {"network", t.network_of(b.address)}, {"public_names", names}});
        }
        instances.push_back({{"name", in->name}, {"role", in->role}, {"pid", pid}, {"listeners", listeners},
                             {"access_log", o.state + "/logs/" + in->name + ".jsonl"}, {"admin", "http://" + admin}});
    }

    // 6. Wait until every endpoint listens; a process that dies says why.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(o.ready_timeout_s);
    std::size_t ready = 0;
    std::vector<bool> up(endpoints.size(), false);
    while (ready < endpoints.size()) {
        for (std::size_t i = 0; i < pids.size(); ++i)
            if (!alive(pids[i])) {
                std::string name = i < t.hosts.size() ? "host-" + t.hosts[i].name : order[i - t.hosts.size()]->name;
                fail(name + " exited while starting:\n" + tail_file(o.state + "/logs/" + name + ".out"));
            }
        // The probe is a connection: an instance's SMTP listener answers it by connecting to
        // the next hop, so instances are probed only once every host listens (otherwise the
        // lab's own probe leaves upstream-connect faults in the logs and the live log view).
        bool hosts_up = true;
        for (std::size_t i = 0; i < endpoints.size(); ++i) hosts_up = hosts_up && (!endpoints[i].host || up[i]);
        for (std::size_t i = 0; i < endpoints.size(); ++i)
            if (!up[i] && (endpoints[i].host || hosts_up) && listening(endpoints[i].address, endpoints[i].port)) up[i] = true, ++ready;
        if (ready == endpoints.size()) break;
        if (std::chrono::steady_clock::now() > deadline) {
            std::string missing;
            for (std::size_t i = 0; i < endpoints.size(); ++i)
                if (!up[i]) missing += " " + endpoints[i].owner + "/" + endpoints[i].name + "@" + endpoints[i].address + ":" + std::to_string(endpoints[i].port);
            fail("not listening after " + std::to_string(o.ready_timeout_s) + " s:" + missing);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }

    // 7. Record it, and say how to use it.
    json networks = json::array();
    for (auto& n : t.networks) {
        json ranges = json::array();
        for (auto& r : n.ranges) ranges.push_back(r.to_string());
        networks.push_back({{"name", n.name}, {"ranges", ranges},
                            {"client_address", n.client_address ? json(n.client_address->to_string()) : json(nullptr)}});
    }
    json st = {{"topology", fs::absolute(o.topology).string()}, {"state", fs::absolute(o.state).string()},
               {"ca_file", fs::absolute(ca.cert_file()).string()}, {"ports_mapped", map}, {"shift", o.shift},
               {"users", users}, {"networks", networks}, {"instances", instances}, {"hosts", hosts}, {"pids", pids}};
    {
        std::ofstream f(o.state + "/lab.json.tmp");
        f << st.dump(2) << "\n";
    }
    fs::rename(o.state + "/lab.json.tmp", o.state + "/lab.json");

    std::cout << "\nLab '" << t.name << "' is up (state in " << o.state << "):\n\n";
    std::printf("  %-12s %-10s %-6s %-22s %s\n", "node", "listener", "proto", "address", "network");
    for (auto& e : endpoints)
        std::printf("  %-12s %-10s %-6s %-22s %s\n", e.owner.c_str(), e.name.c_str(), e.protocol.c_str(),
                    (e.address + ":" + std::to_string(e.port)).c_str(), t.network_of(*rules::ip_address::parse(e.address)).c_str());
    std::string client = "127.10.0.100";
    for (auto& n : t.networks)
        if (n.name == rules::external_network && n.client_address) client = n.client_address->to_string();
    // The public web and mail entry points, as an External client reaches them.
    std::string web_name = t.mx.empty() ? "mail." + t.domain : t.mx, web_addr, smtp_addr;
    std::uint16_t web_port = 0, smtp_port = 0;
    if (auto it = t.names.find(web_name); it != t.names.end())
        if (auto* in = t.find_instance(it->second))
            if (auto a = in->address_on(rules::external_network))
                for (auto& l : in->policy->config().listeners)
                    for (auto& b : l.bind)
                        if (b.address == *a) {
                            if (l.proto == rules::protocol::https) web_addr = a->to_string(), web_port = b.port;
                            if (l.proto == rules::protocol::smtp) smtp_addr = a->to_string(), smtp_port = b.port;
                        }
    std::cout << "\nDemo user (lab only): " << users[0]["name"].get<std::string>() << " / " << users[0]["password"].get<std::string>()
              << "\nLab CA: " << ca.cert_file() << "\n\nTry, as a client on External (" << client << "):\n";
    if (web_port) {
        auto base = "curl --cacert " + ca.cert_file() + " --interface " + client + " --resolve " + web_name + ":" +
                    std::to_string(web_port) + ":" + web_addr;
        // URLs in single quotes: they are pasted into a shell ('&' would background it).
        auto url = [&](const std::string& path) { return "'https://" + web_name + ":" + std::to_string(web_port) + path + "'"; };
        std::cout << "  OWA:           " << base << " " << url("/owa/") << "\n"
                  << "  ActiveSync:    " << base << " -X OPTIONS -i " << url("/Microsoft-Server-ActiveSync") << "\n"
                  << "  EWS:           " << base << " --ntlm -u 'contoso\\demo:" << users[0]["password"].get<std::string>()
                  << "' -X POST -H 'Content-Type: text/xml' -d '<x/>' " << url("/EWS/Exchange.asmx") << "\n"
                  << "  Autodiscover:  " << base << " " << url("/autodiscover/autodiscover.json?Email=demo@" + t.domain + "&Protocol=ActiveSync")
                  << "\n"
                  << "  ECP (denied):  " << base << " -i " << url("/ecp/") << "\n";
    }
    if (smtp_port)
        std::cout << "  Mail:          swaks --server " << smtp_addr << ":" << smtp_port << " --local-interface " << client
                  << " --from someone@example.net --to demo@" << t.domain << "\n"
                  << "  Relay (denied): swaks --server " << smtp_addr << ":" << smtp_port << " --local-interface " << client
                  << " --from someone@example.net --to victim@fabrikam.com\n"
                  << "  Relay (AUTH):  swaks --server " << smtp_addr << ":" << smtp_port << " --local-interface " << client
                  << " -tls --tls-ca-path " << ca.cert_file() << " --auth PLAIN --auth-user demo --auth-password '"
                  << users[0]["password"].get<std::string>() << "' --from demo@" << t.domain << " --to friend@fabrikam.com\n";
    std::cout << "\nAdmin endpoints (metrics, status, reload):\n";
    for (auto& in : instances)
        std::cout << "  " << in["name"].get<std::string>() << ": " << in["admin"].get<std::string>() << "/metrics  "
                  << in["admin"].get<std::string>() << "/status\n";
    {
        // The live log view, served by the front-end's admin endpoint, reading every tier.
        std::vector<std::string> tiers;
        for (const char* role : {"front-end", "back-end", ""})
            for (auto& in : instances)
                if ((role[0] && in["role"] == role) || (!role[0] && in["role"] != "front-end" && in["role"] != "back-end"))
                    tiers.push_back(in["admin"].get<std::string>());
        std::string list;
        for (auto& url : tiers) list += (list.empty() ? "" : ",") + url;
        if (!tiers.empty()) std::cout << "  Live log view (every tier, with filters): " << tiers.front() << "/log?tiers=" << list << "\n";
    }
    std::cout << "  Reload every instance after editing " << o.topology << ": dmzproxy lab reload\n";
    std::cout << "  Status:        dmzproxy lab status [--json]      Stop: dmzproxy lab down\n";
    if (o.detach) return 0;

    // 8. Foreground: one line per request or message at any tier, until Ctrl-C.
    std::cout << "\nLive log (Ctrl-C stops the lab):\n";
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    std::vector<std::pair<std::ifstream, std::string>> logs;
    for (auto* in : order) {
        logs.emplace_back(std::ifstream(o.state + "/logs/" + in->name + ".jsonl"), std::string());
        logs.back().first.seekg(0, std::ios::end);
    }
    while (!g_stop) {
        for (auto& [f, partial] : logs) {
            if (!f.is_open()) continue;
            f.clear();
            std::string line;
            while (std::getline(f, line)) {
                if (f.eof()) {
                    partial += line;
                    break;
                }
                print_log_line(partial + line);
                partial.clear();
            }
        }
        bool any_dead = false;
        for (auto p : pids) any_dead = any_dead || !alive(p);
        if (any_dead) {
            std::cout << "A lab process exited; stopping the lab (see " << o.state << "/logs).\n";
            break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    std::cout << "Stopping the lab...\n";
    stop_pids(pids);
    fs::remove(o.state + "/lab.json");
    return 0;
}

int lab_status(const std::string& state, bool as_json) {
    std::ifstream f(state + "/lab.json");
    if (!f) {
        if (as_json) std::cout << "{\"running\": false}\n";
        else std::cout << "No lab is running from " << state << ".\n";
        return 1;
    }
    auto st = json::parse(f, nullptr, false);
    if (st.is_discarded()) throw std::runtime_error(state + "/lab.json is not valid JSON");
    bool all = true;
    for (auto* group : {&st["instances"], &st["hosts"]})
        for (auto& n : *group) {
            bool a = alive(n["pid"].get<int>());
            n["running"] = a;
            all = all && a;
        }
    st["running"] = all;
    if (as_json) {
        std::cout << st.dump(2) << "\n";
        return all ? 0 : 1;
    }
    std::cout << "Lab from " << st.value("topology", "?") << (all ? " is running" : " is partly DOWN") << "; CA "
              << st.value("ca_file", "?") << "\n";
    if (st.value("shift", 0))
        std::cout << "  shifted " << st.value("shift", 0) << " /16 blocks up\n";
    for (auto& in : st["instances"]) {
        std::cout << "  " << in["name"].get<std::string>() << " (" << in["role"].get<std::string>() << ") pid "
                  << in["pid"].get<int>() << (in["running"].get<bool>() ? "" : " NOT RUNNING") << "\n";
        if (in.contains("admin")) std::cout << "    admin " << in["admin"].get<std::string>() << "/\n";
        for (auto& l : in["listeners"])
            std::cout << "    " << l["name"].get<std::string>() << " " << l["protocol"].get<std::string>() << " "
                      << l["address"].get<std::string>() << ":" << l["port"].get<int>() << " (" << l["network"].get<std::string>() << ")\n";
    }
    for (auto& h : st["hosts"]) {
        std::cout << "  host " << h["name"].get<std::string>() << " pid " << h["pid"].get<int>()
                  << (h["running"].get<bool>() ? "" : " NOT RUNNING") << "\n";
        for (auto& s : h["services"])
            std::cout << "    " << s["name"].get<std::string>() << " " << s["protocol"].get<std::string>() << " "
                      << s["address"].get<std::string>() << ":" << s["port"].get<int>() << "\n";
    }
    return all ? 0 : 1;
}

int lab_down(const std::string& state) {
    std::ifstream f(state + "/lab.json");
    if (!f) {
        std::cout << "No lab is running from " << state << ".\n";
        return 0;
    }
    auto st = json::parse(f, nullptr, false);
    std::vector<pid_t> pids;
    if (!st.is_discarded())
        for (auto& p : st.value("pids", json::array())) pids.push_back(p.get<int>());
    stop_pids(pids);
    fs::remove(state + "/lab.json");
    std::cout << "Lab stopped (" << pids.size() << " processes).\n";
    return 0;
}

}  // namespace dmz::topology
