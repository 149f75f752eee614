#include "admin.hpp"

#include <openssl/crypto.h>

#include <cstdlib>
#include <ctime>
#include <nlohmann/json.hpp>
#include <sstream>

#include "net/buffer.hpp"
#include "log_view.hpp"
#include "dmz/proxy/http/parser.hpp"

namespace dmz::proxy {

using namespace net;

namespace {

std::string label(std::string_view v) {
    std::string out;
    for (char c : v) {
        if (c == '\\' || c == '"') out += '\\';
        if (c == '\n') {
            out += "\\n";
            continue;
        }
        out += c;
    }
    return out;
}

std::string iso(std::chrono::system_clock::time_point t) {
    auto secs = std::chrono::system_clock::to_time_t(t);
    std::tm tm{};
    gmtime_r(&secs, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

metrics::counts total(const admin_view& v) {
    metrics::counts sum;
    for (auto& w : *v.workers) sum.add(w->stats.snapshot());
    return sum;
}

std::string response(int status, const char* reason, const std::string& type, const std::string& body,
                     const std::string& extra = "") {
    return "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\nContent-Type: " + type +
           "\r\nCache-Control: no-store\r\nContent-Length: " + std::to_string(body.size()) + "\r\n" + extra +
           "Connection: close\r\n\r\n" + body;
}

std::string json_response(int status, const char* reason, const nlohmann::json& j, const std::string& extra = "") {
    return response(status, reason, "application/json", j.dump(2) + "\n", extra);
}

/// The 401 for a request without the bearer token the endpoint demands, or "".
std::string unauthorized(const admin_view& v, const http::request_head& head) {
    if (v.token.empty()) return {};
    auto got = std::string(head.get("authorization"));
    auto want = "Bearer " + v.token;
    if (got.size() == want.size() && CRYPTO_memcmp(got.data(), want.data(), want.size()) == 0) return {};
    return json_response(401, "Unauthorized", {{"error", "this admin endpoint needs Authorization: Bearer <token>"}},
                         "WWW-Authenticate: Bearer realm=\"dmzproxy admin\"\r\n");
}

const char* reason_phrase(int status) {
    switch (status) {
        case 200: return "OK";
        case 400: return "Bad Request";
        case 404: return "Not Found";
        case 422: return "Unprocessable Entity";
        case 429: return "Too Many Requests";
        default: return "Error";
    }
}

/// The answer to a request the token check let through (all but /probe, which is async).
std::string answer(const admin_view& v, const http::request_head& head) {
    auto path = head.target.substr(0, head.target.find('?'));
    auto query = head.target.find('?') == std::string_view::npos ? std::string_view() : head.target.substr(head.target.find('?') + 1);
    bool get = head.method == "GET" || head.method == "HEAD";
    // The live log view of one tier may read the other tiers' admin endpoints: only pages
    // served from loopback are let in (a web page elsewhere never sees logs or status).
    std::string cors;
    auto origin = head.get("origin");
    if (!origin.empty() && (origin.rfind("http://127.", 0) == 0 || origin.rfind("http://localhost:", 0) == 0 ||
                            origin.rfind("http://[::1]:", 0) == 0))
        cors = "Access-Control-Allow-Origin: " + std::string(origin) + "\r\nVary: Origin\r\n";
    if (path == "/" || path == "/log") {
        if (!get) return json_response(405, "Method Not Allowed", {{"error", "GET /log"}}, "Allow: GET, HEAD\r\n");
        return response(200, "OK", "text/html; charset=utf-8", log_view_html,
                        "Content-Security-Policy: default-src 'self'; connect-src 'self' http:; "
                        "script-src 'unsafe-inline'; style-src 'unsafe-inline'\r\nX-Frame-Options: DENY\r\n");
    }
    if (path == "/log/events") {
        if (!get) return json_response(405, "Method Not Allowed", {{"error", "GET /log/events"}}, "Allow: GET, HEAD\r\n");
        std::uint64_t since = 0;
        auto p = query.find("since=");
        if (p != std::string_view::npos) since = std::strtoull(std::string(query.substr(p + 6)).c_str(), nullptr, 10);
        auto [next, lines] = v.log ? v.log->recent(since) : std::pair<std::uint64_t, std::vector<std::string>>{0, {}};
        std::string body = "{\"next\": " + std::to_string(next) + ", \"lines\": [";
        for (std::size_t i = 0; i < lines.size(); ++i) body += (i ? ",\n" : "\n") + lines[i];
        body += "]}\n";
        return response(200, "OK", "application/json", body, cors);
    }
    if (path == "/metrics") {
        if (!get) return json_response(405, "Method Not Allowed", {{"error", "GET /metrics"}}, "Allow: GET, HEAD\r\n");
        return response(200, "OK", "text/plain; version=0.0.4; charset=utf-8", render_metrics(v));
    }
    if (path == "/status") {
        if (!get) return json_response(405, "Method Not Allowed", {{"error", "GET /status"}}, "Allow: GET, HEAD\r\n");
        return response(200, "OK", "application/json", render_status(v), cors);
    }
    if (path == "/reload") {
        if (head.method != "POST") return json_response(405, "Method Not Allowed", {{"error", "POST /reload"}}, "Allow: POST\r\n");
        auto [ok, message] = v.reload();
        if (ok) return json_response(200, "OK", {{"ok", true}, {"config_version", *v.version}, {"message", message}});
        return json_response(422, "Unprocessable Entity", {{"ok", false}, {"config_version", *v.version}, {"error", message}});
    }
    return json_response(404, "Not Found", {{"error", "no such admin resource"}, {"resources", {"/metrics", "/status", "/reload", "/probe", "/log"}}});
}

task<> admin_session(worker& w, tcp::socket s, const admin_view& v) {
    stream st(std::move(s));
    watchdog dog(w.io, st);
    dog.arm(std::chrono::seconds(5));
    flat_buffer in(4096);
    http::request_head head;
    http::parse_error perr;
    http::limits lim{8192, 16 * 1024, 100};
    std::string out;
    while (true) {
        auto r = http::parse_request(in.data(), lim, head, perr);
        if (r == http::result::done) {
            out = unauthorized(v, head);
            auto path = head.target.substr(0, head.target.find('?'));
            if (out.empty() && path == "/probe" && head.method == "POST") {
                auto query = head.target.substr(std::min(head.target.size(), head.target.find('?') + 1));
                dog.arm(std::chrono::seconds(70));  // the rule's own connect timeout bounds the probe
                auto got = co_await run_probe(w, v, query);
                dog.arm(std::chrono::seconds(5));
                out = response(got.status, reason_phrase(got.status), "application/json", got.json, got.extra);
            } else if (out.empty() && path == "/probe") {
                out = json_response(405, "Method Not Allowed", {{"error", "POST /probe?rule=NAME"}}, "Allow: POST\r\n");
            } else if (out.empty()) {
                out = answer(v, head);
            }
            if (head.method == "HEAD") out.resize(out.find("\r\n\r\n") + 4);
            break;
        }
        if (r == http::result::error) {
            out = json_response(perr.status, "Bad Request", {{"error", perr.code + ": " + perr.detail}});
            break;
        }
        error_code ec;
        std::size_t room = 0;
        char* p = in.prepare(4096, room);
        auto n = co_await st.read_some(asio::buffer(p, room), ec);
        if (ec) co_return;
        in.commit(n);
    }
    error_code ec;
    co_await st.write(asio::buffer(out), ec);
    st.shutdown_send();
    dog.stop();
    st.close();
}

task<> admin_accept(worker& w, std::shared_ptr<tcp::acceptor> acc, const admin_view& v) {
    while (acc->is_open()) {
        error_code ec;
        tcp::socket s(w.io);
        co_await acc->async_accept(s, redirect(ec));
        if (ec) {
            if (ec == asio::error::operation_aborted || !acc->is_open()) co_return;
            continue;
        }
        spawn_guarded(w, "admin session", admin_session(w, std::move(s), v));
    }
}

}  // namespace

std::string render_metrics(const admin_view& v) {
    auto c = total(v);
    auto& rt = **v.current;
    std::string inst = "instance=\"" + label(rt.name) + "\"";
    std::ostringstream o;
    o << "# HELP dmzproxy_requests_total HTTP requests by rule, action, status class and fault class.\n"
      << "# TYPE dmzproxy_requests_total counter\n";
    for (auto& [k, n] : c.requests) {
        std::string parts[4];
        std::size_t from = 0;
        for (int i = 0; i < 4; ++i) {
            auto to = k.find('\0', from);
            parts[i] = k.substr(from, to == std::string::npos ? std::string::npos : to - from);
            from = to == std::string::npos ? k.size() : to + 1;
        }
        o << "dmzproxy_requests_total{" << inst << ",rule=\"" << label(parts[0]) << "\",action=\"" << label(parts[1])
          << "\",status=\"" << parts[2] << "\",fault=\"" << label(parts[3]) << "\"} " << n << "\n";
    }
    o << "# HELP dmzproxy_received_bytes_total Bytes received from clients.\n# TYPE dmzproxy_received_bytes_total counter\n"
      << "dmzproxy_received_bytes_total{" << inst << "} " << c.bytes_in << "\n"
      << "# HELP dmzproxy_sent_bytes_total Bytes sent to clients.\n# TYPE dmzproxy_sent_bytes_total counter\n"
      << "dmzproxy_sent_bytes_total{" << inst << "} " << c.bytes_out << "\n";
    o << "# HELP dmzproxy_request_duration_seconds HTTP request duration, from the first byte of the head to the "
         "last byte of the answer.\n# TYPE dmzproxy_request_duration_seconds histogram\n";
    std::uint64_t cum = 0;
    for (std::size_t i = 0; i < metrics::buckets.size(); ++i) {
        cum += c.latency[i];
        o << "dmzproxy_request_duration_seconds_bucket{" << inst << ",le=\"" << metrics::buckets[i] << "\"} " << cum << "\n";
    }
    cum += c.latency[metrics::buckets.size()];
    o << "dmzproxy_request_duration_seconds_bucket{" << inst << ",le=\"+Inf\"} " << cum << "\n"
      << "dmzproxy_request_duration_seconds_sum{" << inst << "} " << c.latency_sum << "\n"
      << "dmzproxy_request_duration_seconds_count{" << inst << "} " << c.latency_count << "\n";
    o << "# HELP dmzproxy_connections_active Open client connections by listener.\n# TYPE dmzproxy_connections_active gauge\n";
    for (auto& l : rt.listeners) {
        auto it = c.active.find(l->cfg->name);
        o << "dmzproxy_connections_active{" << inst << ",listener=\"" << label(l->cfg->name) << "\"} "
          << (it == c.active.end() ? 0 : it->second) << "\n";
    }
    o << "# HELP dmzproxy_upstream_pool_idle_connections Idle keep-alive connections to upstreams, ready for reuse.\n"
      << "# TYPE dmzproxy_upstream_pool_idle_connections gauge\n"
      << "dmzproxy_upstream_pool_idle_connections{" << inst << "} " << c.pool_idle << "\n";
    o << "# HELP dmzproxy_connections_parked Idle keep-alive client connections parked outside a session "
         "(counted in dmzproxy_connections_active too).\n"
      << "# TYPE dmzproxy_connections_parked gauge\n"
      << "dmzproxy_connections_parked{" << inst << "} " << c.parked << "\n";
    o << "# HELP dmzproxy_smtp_messages_total Mail transactions: accepted by the next hop, or refused.\n"
      << "# TYPE dmzproxy_smtp_messages_total counter\n"
      << "dmzproxy_smtp_messages_total{" << inst << ",outcome=\"accepted\"} " << c.smtp_accepted << "\n"
      << "dmzproxy_smtp_messages_total{" << inst << ",outcome=\"refused\"} " << c.smtp_refused << "\n"
      << "# HELP dmzproxy_smtp_relay_denied_total Recipients refused as relaying.\n"
      << "# TYPE dmzproxy_smtp_relay_denied_total counter\n"
      << "dmzproxy_smtp_relay_denied_total{" << inst << "} " << c.smtp_relay_denied << "\n";
    o << "# HELP dmzproxy_faults_total HTTP requests and SMTP transactions that ended in a fault, by protocol, fault "
         "class and side (client, tier, upstream).\n# TYPE dmzproxy_faults_total counter\n";
    for (auto& [k, n] : c.faults)
        o << "dmzproxy_faults_total{" << inst << ",protocol=\"" << std::get<0>(k) << "\",class=\"" << rules::to_string(std::get<1>(k))
          << "\",side=\"" << rules::to_string(std::get<2>(k)) << "\"} " << n << "\n";
    o << "# HELP dmzproxy_auth_failures_total Refused credentials by reason.\n# TYPE dmzproxy_auth_failures_total counter\n";
    for (auto& [reason, n] : c.auth_failures)
        o << "dmzproxy_auth_failures_total{" << inst << ",reason=\"" << label(reason) << "\"} " << n << "\n";
    o << "# HELP dmzproxy_lockout_refusals_total Logins refused because the user or address is locked out.\n"
      << "# TYPE dmzproxy_lockout_refusals_total counter\n"
      << "dmzproxy_lockout_refusals_total{" << inst << "} " << c.lockouts << "\n";
    o << "# HELP dmzproxy_config_version Successful loads of the config since start (1: the first).\n"
      << "# TYPE dmzproxy_config_version gauge\n"
      << "dmzproxy_config_version{" << inst << "} " << *v.version << "\n"
      << "# HELP dmzproxy_start_time_seconds When the process started (Unix time).\n# TYPE dmzproxy_start_time_seconds gauge\n"
      << "dmzproxy_start_time_seconds{" << inst << "} "
      << std::chrono::duration_cast<std::chrono::seconds>(v.started.time_since_epoch()).count() << "\n";
    return o.str();
}

std::string render_status(const admin_view& v) {
    auto c = total(v);
    auto& rt = **v.current;
    auto now = std::chrono::system_clock::now();
    nlohmann::json listeners = nlohmann::json::array(), rules = nlohmann::json::array();
    for (auto& l : rt.listeners) {
        nlohmann::json binds = nlohmann::json::array();
        for (auto& b : l->cfg->bind) binds.push_back(b.to_string());
        auto it = c.active.find(l->cfg->name);
        listeners.push_back({{"name", l->cfg->name},
                             {"protocol", rules::to_string(l->cfg->proto)},
                             {"bind", binds},
                             {"active_connections", it == c.active.end() ? 0 : it->second}});
    }
    for (auto& r : rt.config().rules) {
        auto it = c.rule_hits.find(r.name);
        rules.push_back({{"name", r.name}, {"enabled", r.enabled}, {"hits", it == c.rule_hits.end() ? 0 : it->second}});
    }
    std::uint64_t requests = 0;
    for (auto& [k, n] : c.requests) requests += n;
    nlohmann::json j = {
        {"instance", rt.name},
        {"role", rt.role},
        {"config", {{"source", v.source}, {"version", *v.version}, {"loaded", iso(*v.loaded)}}},
        {"started", iso(v.started)},
        {"uptime_seconds", std::chrono::duration_cast<std::chrono::seconds>(now - v.started).count()},
        {"draining", *v.draining},
        {"parked_connections", c.parked},
        {"listeners", listeners},
        {"rules", rules},
        {"requests", requests},
        {"smtp", {{"accepted", c.smtp_accepted}, {"refused", c.smtp_refused}, {"relay_denied", c.smtp_relay_denied}}},
    };
    return j.dump(2) + "\n";
}

void start_admin(worker& w, const rules::bind_endpoint& at, const admin_view& view) {
    auto acc = std::make_shared<tcp::acceptor>(w.io);
    tcp::endpoint ep(asio::ip::make_address(at.address.to_string()), at.port);
    error_code ec;
    acc->open(ep.protocol(), ec);
    if (!ec) acc->set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec) acc->bind(ep, ec);
    if (!ec) acc->listen(64, ec);
    if (ec) throw std::runtime_error("admin endpoint: cannot listen on " + at.to_string() + ": " + ec.message());
    spawn_guarded(w, "admin accept loop", admin_accept(w, acc, view));
}

}  // namespace dmz::proxy
