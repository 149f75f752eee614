#include "dmz/topology/diagnose.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "dmz/certs/certs.hpp"

namespace dmz::topology {

namespace {

constexpr int probe_timeout_ms = 5000;

/// A TCP connection from `source` to `address:port`, with a deadline. Returns the fd, or
/// -1 with `why` in TMG's words.
/// `source` null: the system picks. `not_here` says the source is no address of this machine.
int connect_from(const ip_address* source, const ip_address& address, std::uint16_t port, std::string& why,
                 bool* not_here = nullptr) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in src{}, dst{};
    src.sin_family = dst.sin_family = AF_INET;
    if (source) inet_pton(AF_INET, source->to_string().c_str(), &src.sin_addr);
    inet_pton(AF_INET, address.to_string().c_str(), &dst.sin_addr);
    dst.sin_port = htons(port);
    if (source && ::bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof src) != 0) {
        if (not_here) *not_here = errno == EADDRNOTAVAIL;
        why = "cannot use source address " + source->to_string() + ": " + std::strerror(errno);
        ::close(fd);
        return -1;
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    int r = ::connect(fd, reinterpret_cast<sockaddr*>(&dst), sizeof dst);
    if (r != 0 && errno == EINPROGRESS) {
        pollfd pfd{fd, POLLOUT, 0};
        if (::poll(&pfd, 1, probe_timeout_ms) <= 0) {
            why = "connection timed out (10060)";
            ::close(fd);
            return -1;
        }
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
        r = err ? -1 : 0;
        errno = err;
    }
    if (r != 0) {
        why = errno == ECONNREFUSED ? "connection refused (10061)"
              : errno == ENETUNREACH || errno == EHOSTUNREACH ? "no route (10065)"
                                                              : std::string(std::strerror(errno));
        ::close(fd);
        return -1;
    }
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    timeval tv{probe_timeout_ms / 1000, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

using ctx_ptr = std::unique_ptr<SSL_CTX, void (*)(SSL_CTX*)>;
using ssl_ptr = std::unique_ptr<SSL, void (*)(SSL*)>;

ctx_ptr client_context(const std::string& ca_file) {
    ctx_ptr ctx(SSL_CTX_new(TLS_client_method()), &SSL_CTX_free);
    SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
    if (!ca_file.empty()) SSL_CTX_load_verify_locations(ctx.get(), ca_file.c_str(), nullptr);
    else SSL_CTX_set_default_verify_paths(ctx.get());
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_NONE, nullptr);  // judged below, so every failure is named
    return ctx;
}

/// TLS handshake on `fd` for `name`: "ok", or name mismatch / untrusted chain / handshake
/// failure. `names` gets the certificate's names.
std::string tls_check(SSL_CTX* ctx, int fd, const std::string& name, std::string& names, ssl_ptr& keep) {
    ssl_ptr ssl(SSL_new(ctx), &SSL_free);
    SSL_set_fd(ssl.get(), fd);
    SSL_set_tlsext_host_name(ssl.get(), name.c_str());
    SSL_set1_host(ssl.get(), name.c_str());
    if (SSL_connect(ssl.get()) != 1) {
        unsigned long e = ERR_get_error();
        char buf[200] = "no detail";
        if (e) ERR_error_string_n(e, buf, sizeof buf);
        return std::string("handshake failure: ") + buf;
    }
    if (X509* peer = SSL_get1_peer_certificate(ssl.get())) {
        auto* sans = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(peer, NID_subject_alt_name, nullptr, nullptr));
        for (int i = 0; sans && i < sk_GENERAL_NAME_num(sans); ++i) {
            auto* gn = sk_GENERAL_NAME_value(sans, i);
            if (gn->type == GEN_DNS)
                names += (names.empty() ? "" : ", ") +
                         std::string(reinterpret_cast<const char*>(ASN1_STRING_get0_data(gn->d.dNSName)),
                                     static_cast<std::size_t>(ASN1_STRING_length(gn->d.dNSName)));
        }
        if (sans) GENERAL_NAMES_free(sans);
        X509_free(peer);
    }
    long v = SSL_get_verify_result(ssl.get());
    keep = std::move(ssl);
    if (v == X509_V_ERR_HOSTNAME_MISMATCH) return "name mismatch: the certificate is not for '" + name + "'";
    if (v != X509_V_OK) return std::string("untrusted chain: ") + X509_verify_cert_error_string(v);
    return "ok";
}

struct io {
    int fd;
    SSL* ssl;
    bool send(const std::string& s) {
        return ssl ? SSL_write(ssl, s.data(), static_cast<int>(s.size())) == static_cast<int>(s.size())
                   : ::send(fd, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
    }
    /// Reads until `until` appears (or the deadline / close).
    std::string recv_until(const std::string& until, std::size_t max = 65536) {
        std::string out;
        char buf[4096];
        while (out.find(until) == std::string::npos && out.size() < max) {
            int n = ssl ? SSL_read(ssl, buf, sizeof buf) : static_cast<int>(::recv(fd, buf, sizeof buf, 0));
            if (n <= 0) break;
            out.append(buf, static_cast<std::size_t>(n));
        }
        return out;
    }
    /// One SMTP reply (last line "DDD ").
    std::string smtp_reply() {
        std::string out;
        while (true) {
            auto more = recv_until("\r\n");
            if (more.empty()) return out;
            out += more;
            auto last = out.rfind("\r\n", out.size() - 3);
            auto line = out.substr(last == std::string::npos ? 0 : last + 2);
            if (line.size() >= 4 && line[3] == ' ') return out;
        }
    }
};

std::string header(const std::string& head, const std::string& name) {
    auto lower = rules::to_lower(head);
    auto pos = lower.find("\r\n" + rules::to_lower(name) + ":");
    if (pos == std::string::npos) return "";
    auto start = pos + 3 + name.size();
    auto end = head.find("\r\n", start);
    auto v = head.substr(start, end - start);
    while (!v.empty() && v.front() == ' ') v.erase(0, 1);
    return v;
}

std::string field(const std::string& x_dmz_error, int n) {
    std::size_t start = 0;
    for (int i = 0; i < n; ++i) {
        start = x_dmz_error.find("; ", start);
        if (start == std::string::npos) return "";
        start += 2;
    }
    auto end = n < 2 ? x_dmz_error.find("; ", start) : std::string::npos;
    return x_dmz_error.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

/// One hop probed from here: from the hop's own source address (the client's only when
/// `bind`), then TLS for https.
hop_probe probe_here(hop_probe hp, SSL_CTX* ctx, bool bind) {
    std::string why;
    bool not_here = false;
    int fd = connect_from(bind ? &hp.hop.source : nullptr, hp.hop.address, hp.hop.port, why, &not_here);
    if (fd < 0 && not_here) {
        hp.probed = false;
        hp.tcp = "not probed: " + hp.hop.source.to_string() + " is not an address of this machine, and '" + hp.hop.from +
                 "' names no admin endpoint to ask ([instance] admin in its config)";
        return hp;
    }
    hp.tcp = fd < 0 ? why : "ok";
    if (fd >= 0 && hp.hop.proto == rules::protocol::https) {
        ssl_ptr keep(nullptr, &SSL_free);
        hp.tls = tls_check(ctx, fd, hp.hop.sni, hp.tls_detail, keep);
    }
    if (fd >= 0) ::close(fd);
    return hp;
}

/// One hop probed by the instance it leaves from, through its admin endpoint.
hop_probe probe_there(hop_probe hp, const remote_probe& r) {
    hp.by = hp.hop.from;
    if (!r.error.empty()) {
        hp.probed = false;
        hp.tcp = "not probed: asking '" + hp.hop.from + "' failed: " + r.error;
        return hp;
    }
    hp.tcp = r.tcp;
    hp.tls = hp.hop.proto == rules::protocol::https ? r.tls : "";
    hp.tls_detail = r.names;
    // What the running instance used: the address it is configured with, not the file's.
    if (auto a = ip_address::parse(r.source)) hp.hop.source = *a;
    if (auto a = ip_address::parse(r.address)) hp.hop.address = *a;
    if (r.port > 0) hp.hop.port = static_cast<std::uint16_t>(r.port);
    return hp;
}

}  // namespace

diagnosis diagnose(const topology& t, const probe& p, const diagnose_settings& s) {
    diagnosis d;
    d.offline = explain(t, p, s.map_ports);
    auto& ex = d.offline;
    auto ctx = client_context(s.ca_file);

    // 1. Each hop as it really is: the client's from here, every other by the tier it
    // leaves from (its admin endpoint), or from here on that tier's address.
    for (std::size_t i = 0; i < ex.hops.size(); ++i) {
        hop_probe hp;
        hp.hop = ex.hops[i];
        if (i < ex.tiers.size()) {
            hp.rule = ex.tiers[i].matched_rule;
            // An allow rule that wants a user is not a deny: say what it needs.
            hp.action = ex.tiers[i].decision.why == rules::fault_class::auth_required ? "allow, needs a user" : ex.tiers[i].action;
        }
        std::optional<remote_probe> asked;
        if (i > 0 && s.ask && i - 1 < ex.tiers.size() && !ex.tiers[i - 1].matched_rule.empty())
            asked = s.ask(hp.hop.from, ex.tiers[i - 1].matched_rule);
        hp = asked ? probe_there(std::move(hp), *asked) : probe_here(std::move(hp), ctx.get(), i > 0 || s.bind_client);
        d.hops.push_back(hp);
        auto name = hp.hop.from + " -> " + hp.hop.to;
        if (!hp.probed) continue;
        if (d.verdict.empty() && hp.tcp != "ok") {
            d.verdict = "network-fault", d.hop = name, d.tier = hp.hop.to;
            d.reason = hp.tcp + " at " + hp.hop.address.to_string() + ":" + std::to_string(hp.hop.port);
        } else if (d.verdict.empty() && !hp.tls.empty() && hp.tls != "ok") {
            d.verdict = "network-fault", d.hop = name, d.tier = hp.hop.to;
            d.reason = "TLS " + hp.tls + (hp.tls_detail.empty() ? "" : " (its names: " + hp.tls_detail + ")");
        }
    }
    if (d.verdict.empty() && ex.result == outcome::network_fault) {
        d.verdict = "network-fault", d.hop = ex.stopped_at, d.reason = ex.reason;
    }

    // 2. The request itself, end to end, from the client.
    if (!ex.hops.empty() && d.hops.front().tcp == "ok") {
        auto& first = ex.hops.front();
        std::string why;
        int fd = connect_from(s.bind_client ? &first.source : nullptr, first.address, first.port, why);
        ssl_ptr ssl(nullptr, &SSL_free);
        if (fd >= 0 && first.proto == rules::protocol::https) {
            std::string names;
            tls_check(ctx.get(), fd, first.sni, names, ssl);
        }
        io c{fd, ssl.get()};
        if (fd >= 0 && p.smtp) {
            auto banner = c.smtp_reply();
            std::string last = banner;
            if (banner.rfind("220", 0) == 0) {
                c.send("EHLO diagnose.dmzproxy\r\n");
                c.smtp_reply();
                c.send("MAIL FROM:<" + (p.mail_from.empty() ? std::string("diagnose@example.net") : p.mail_from) + ">\r\n");
                last = c.smtp_reply();
                if (last.rfind("2", 0) == 0) {
                    c.send("RCPT TO:<" + p.rcpt + ">\r\n");
                    last = c.smtp_reply();
                }
                c.send("RSET\r\nQUIT\r\n");  // nothing is delivered by a probe
            }
            d.status = last.size() >= 3 ? std::atoi(last.substr(0, 3).c_str()) : 0;
            d.response = last.substr(0, last.find("\r\n", last.size() > 2 ? last.size() - 2 : 0));
            while (!d.response.empty() && (d.response.back() == '\n' || d.response.back() == '\r')) d.response.pop_back();
            if (d.verdict.empty()) {
                if (d.status / 100 == 2) d.verdict = "ok";
                else if (d.status == 421) {
                    // "421 4.4.1 mail.contoso.com (back-end): ..." names the tier that lost its upstream.
                    auto open = d.response.find('('), close = d.response.find(')');
                    d.tier = open != std::string::npos && close > open ? d.response.substr(open + 1, close - open - 1) : "";
                    d.verdict = "network-fault", d.reason = d.response;
                    // The path a deliverable mail takes names the hop after that tier.
                    auto q = p;
                    q.rcpt = "postmaster@" + (t.domain.empty() ? std::string("localhost") : t.domain);
                    for (auto& h : explain(t, q, s.map_ports).hops)
                        if (h.from == d.tier) d.hop = h.from + " -> " + h.to;
                    if (d.hop.empty()) d.hop = d.tier + " -> next";
                } else {
                    d.verdict = d.status == 530 || d.status == 535 ? "auth-fault" : "rule-fault";
                    // Offline the proxies let it through: the refusal is the host's own.
                    d.tier = ex.result == outcome::ok ? ex.reached : ex.stopped_at.empty() ? first.to : ex.stopped_at;
                    d.reason = d.response;
                }
            }
        } else if (fd >= 0) {
            auto u = p.url;
            auto path_pos = u.find('/', u.find("://") + 3);
            auto target = path_pos == std::string::npos ? std::string("/") : u.substr(path_pos);
            std::string authz;
            if (!p.user.empty() && !p.password.empty()) {
                auto cred = p.user + ":" + p.password;
                std::string b64(4 * ((cred.size() + 2) / 3) + 1, '\0');
                auto n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(b64.data()), reinterpret_cast<const unsigned char*>(cred.data()),
                                         static_cast<int>(cred.size()));
                b64.resize(static_cast<std::size_t>(n));
                authz = "\r\nAuthorization: Basic " + b64;
            }
            c.send(p.method + " " + target + " HTTP/1.1\r\nHost: " + first.host + authz +
                   "\r\nUser-Agent: dmzproxy-diagnose\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            auto head = c.recv_until("\r\n\r\n");
            d.status = head.size() >= 12 ? std::atoi(head.substr(9, 3).c_str()) : 0;
            d.response = header(head, "X-Dmz-Error");
            if (d.verdict.empty()) {
                if (d.status == 0) {
                    d.verdict = "network-fault", d.hop = first.from + " -> " + first.to, d.reason = "no HTTP answer";
                } else if (!d.response.empty()) {
                    auto inst = field(d.response, 0), cls = field(d.response, 1);
                    d.tier = inst;
                    d.reason = field(d.response, 2);
                    if (cls == "rule-denied" || cls == "no-rule-matched") d.verdict = "rule-fault";
                    else if (cls == "auth-required" || cls == "auth-failed") d.verdict = "auth-fault";
                    else if (cls == "bad-request") d.verdict = "rule-fault";
                    else {
                        d.verdict = "network-fault";
                        for (auto& h : ex.hops)
                            if (h.from == inst) d.hop = h.from + " -> " + h.to;
                        if (d.hop.empty()) d.hop = inst + " -> next";
                    }
                } else if (d.status == 401) {
                    d.verdict = "auth-fault", d.tier = ex.reached.empty() ? "host" : ex.reached;
                    d.reason = "the host asks for credentials (" + header(head, "WWW-Authenticate") + ")";
                } else {
                    d.verdict = "ok";
                    d.reason = "the host answered " + std::to_string(d.status);
                }
            }
        }
        if (fd >= 0) {
            if (ssl) SSL_shutdown(ssl.get());
            ::close(fd);
        }
    }
    if (d.verdict.empty()) d.verdict = "network-fault", d.reason = ex.reason;
    if (d.verdict == "ok" && d.reason.empty()) d.reason = ex.reason;

    // 3. What the tiers' test rules would change, for this probe alone (nothing is opened).
    // A refusal by the host itself, where every tier let the probe through (the file agrees):
    // no test rule of a tier is involved, and the file is not out of date.
    bool host_refused = d.verdict == "rule-fault" && ex.result == outcome::ok;
    if (host_refused) {
        d.test_rules = "every tier let this probe through; '" + d.tier +
                       "' refused it itself, so the tiers' test rules change nothing";
    } else if (d.verdict == "rule-fault") {
        auto q = p;
        q.with_test_rules = true;
        auto alt = explain(t, q, s.map_ports);
        d.test_rules = alt.result == outcome::ok
                           ? "with each tier's test rule enabled this probe would reach '" + alt.reached + "': a rule stops it, the network is fine"
                           : "even with the test rules it would fail: " + std::string(to_string(alt.result)) + " at " + alt.stopped_at + " (" + alt.reason + ")";
    }
    // Tiers after the one that stopped the probe live were never asked: the offline
    // answer (which assumes the credentials work) must not show them as allowing.
    if (d.verdict != "ok" && !d.tier.empty()) {
        bool past = false;
        for (std::size_t i = 0; i < d.hops.size() && i < ex.tiers.size(); ++i) {
            if (past && !d.hops[i].rule.empty()) d.hops[i].action = "not reached: stopped at " + d.tier;
            bool here = ex.tiers[i].instance == d.tier;
            if (here && d.verdict == "auth-fault" && !p.user.empty()) d.hops[i].action = "allow for a valid user; refused these credentials";
            past = past || here;
        }
    }
    // Where the running instances and the topology file disagree (an edited file not yet reloaded).
    // Network faults are invisible offline; anything else should agree with the file.
    bool live_ok = d.verdict == "ok";
    // A refused password is invisible offline too (the file assumes the user's credentials work).
    bool password_refused = d.verdict == "auth-fault" && !p.user.empty();
    if (d.verdict != "network-fault" && !password_refused && !host_refused && live_ok != (ex.result == outcome::ok))
        d.note = std::string("the topology file says ") + to_string(ex.result) + " (" + ex.reason +
                 "), the running instances say " + d.verdict + ": were they started from another version of the file (reload them)?";
    return d;
}

}  // namespace dmz::topology
