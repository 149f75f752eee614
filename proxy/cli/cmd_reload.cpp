// dmzproxy reload ADMIN-URL [--token-file F]: asks a running instance to reload its config
// through its admin endpoint, and exits non-zero (with the reason) when it refused.
#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.hpp"

namespace dmz::cli {

namespace {

struct reload_cli {
    std::string url, token_file;
    double timeout = 30;
};

/// "http://HOST:PORT[/...]" -> host, port. Only plain http: the admin endpoint is local.
bool split_url(const std::string& url, std::string& host, std::string& port) {
    const std::string scheme = "http://";
    if (url.rfind(scheme, 0) != 0) return false;
    auto rest = url.substr(scheme.size());
    rest = rest.substr(0, rest.find('/'));
    auto colon = rest.rfind(':');
    if (colon == std::string::npos || colon + 1 == rest.size()) return false;
    host = rest.substr(0, colon);
    port = rest.substr(colon + 1);
    if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    return !host.empty();
}

}  // namespace

/// POST /reload to an admin endpoint. Exit code as `dmzproxy reload`: 0 reloaded (the
/// message in `out`), 1 refused (the reason in `err`), 2 unreachable or not an admin URL.
int reload_instance(const std::string& url, const std::string& token, double timeout, std::string& out, std::string& err) {
    std::string host, port;
    if (!split_url(url, host, port)) {
        err = "'" + url + "' is not http://HOST:PORT";
        return 2;
    }
    addrinfo hints{}, *res = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || !res) {
        err = "'" + host + "' is not an IP address";
        return 2;
    }
    int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    timeval tv{static_cast<time_t>(timeout), 0};
    if (fd >= 0) {
        ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    }
    if (fd < 0 || ::connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
        err = "cannot connect to " + url + ": " + std::strerror(errno) + " (is the instance running with an admin endpoint there?)";
        freeaddrinfo(res);
        if (fd >= 0) ::close(fd);
        return 2;
    }
    freeaddrinfo(res);
    std::string req = "POST /reload HTTP/1.1\r\nHost: " + host + ":" + port + "\r\nContent-Length: 0\r\n" +
                      (token.empty() ? "" : "Authorization: Bearer " + token + "\r\n") + "Connection: close\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
        err = std::string("sending the request failed: ") + std::strerror(errno);
        ::close(fd);
        return 2;
    }
    std::string got;
    char buf[4096];
    ssize_t n;
    while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) got.append(buf, static_cast<std::size_t>(n));
    ::close(fd);
    auto end = got.find("\r\n\r\n");
    if (got.rfind("HTTP/1.1 ", 0) != 0 || end == std::string::npos) {
        err = "no answer from " + url + (n < 0 ? std::string(": ") + std::strerror(errno) : std::string());
        return 2;
    }
    int status = std::atoi(got.c_str() + 9);
    auto body = nlohmann::json::parse(got.substr(end + 4), nullptr, false);
    if (status == 200) {
        out = body.is_object() ? body.value("message", std::string("reloaded")) : std::string("reloaded");
        return 0;
    }
    std::string why = body.is_object() ? body.value("error", std::string()) : std::string();
    err = "refused (HTTP " + std::to_string(status) + ")" +
          (body.is_object() && body.contains("config_version")
               ? ", still running config version " + std::to_string(body["config_version"].get<int>())
               : std::string()) +
          ":\n" + why;
    return 1;
}

command add_reload(CLI::App& app) {
    auto o = std::make_shared<reload_cli>();
    auto* sub = app.add_subcommand("reload", "Reload a running instance's config through its admin endpoint (like SIGHUP, "
                                             "but waits for the answer: exit 1 and the reason when it is refused)");
    sub->add_option("url", o->url, "the instance's admin endpoint, e.g. http://127.0.0.1:9401")->required();
    sub->add_option("--token-file", o->token_file, "file holding the admin bearer token (the instance's admin_token_file)");
    sub->add_option("--timeout", o->timeout, "seconds to wait for the answer (default 30)")->check(CLI::Range(1.0, 3600.0));
    return [o]() -> int {
        std::string token;
        if (!o->token_file.empty()) {
            std::ifstream f(o->token_file);
            if (!f || !std::getline(f, token)) {
                std::cerr << "dmzproxy reload: cannot read " << o->token_file << "\n";
                return 2;
            }
            while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
            while (!token.empty() && std::isspace(static_cast<unsigned char>(token.front()))) token.erase(0, 1);
        }
        std::string out, err;
        int rc = reload_instance(o->url, token, o->timeout, out, err);
        if (rc == 0) std::cout << out << "\n";
        else std::cerr << "dmzproxy reload: " << err << (err.empty() || err.back() == '\n' ? "" : "\n");
        return rc;
    };
}

}  // namespace dmz::cli
