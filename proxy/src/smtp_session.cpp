// One SMTP client connection. In `smtp` mode the session speaks SMTP on both sides:
// - it answers EHLO, STARTTLS and AUTH itself;
// - it judges every recipient against the rules (submit or relay);
// - it answers MAIL itself once the sender passes its checks, and sends it upstream with
//   the first RCPT (pipelined when the upstream offers PIPELINING): the upstream's answer
//   to MAIL, if a refusal, is the client's answer to that RCPT (as Postfix's
//   smtpd_delay_reject does), and its answer to each RCPT reaches the client unchanged;
// - it takes DATA (or BDAT chunks, RFC 3030) whole and clean before anything of it goes
//   upstream, and sends it on by BDAT when the upstream offers CHUNKING, else by DATA.
// The client gets 250 at the end of DATA only once the upstream has accepted the message.
// In `tcp` mode it is a byte pipe (TMG's server publishing).
#include <algorithm>
#include <charconv>

#include "dmz/proxy/smtp/parser.hpp"
#include "dmz/proxy/smtp/replies.hpp"
#include "dmz/rules/path.hpp"
#include "runtime.hpp"

namespace dmz::proxy {

using namespace net;
using clock_type = std::chrono::steady_clock;

namespace {

constexpr int max_bad_commands = 20;

class smtp_session : public std::enable_shared_from_this<smtp_session> {
public:
    smtp_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, tcp::socket s)
        : w_(w), rt_(std::move(rt)), l_(l), down_(std::move(s)), dog_(w.io, down_), id_(next_connection_id()) {
        error_code ec;
        auto ep = down_.socket().remote_endpoint(ec);
        if (auto a = rules::ip_address::parse(ep.address().to_string())) peer_ = *a;
        auto lep = down_.socket().local_endpoint(ec);
        local_addr_ = lep.address().to_string();
        local_port_ = lep.port();
        client_ = peer_;
        down_.socket().set_option(tcp::no_delay(true), ec);
        name_ = l.cfg->public_name.empty() ? rt_->name : l.cfg->public_name;
    }

    ~smtp_session() {
        smtp_sessions().fetch_sub(1, std::memory_order_relaxed);
        w_.stats.connection(counted_as_, -1);
    }

    void start() {
        smtp_sessions().fetch_add(1, std::memory_order_relaxed);
        counted_as_ = lcfg().name;
        w_.stats.connection(counted_as_, 1);
        std::weak_ptr<smtp_session> weak = shared_from_this();
        w_.shutdown_hooks[id_] = [weak] {
            if (auto self = weak.lock()) self->shutdown();
        };
        spawn_guarded(w_, "smtp session", [self = shared_from_this()]() { return self->run(); });
    }

    /// The instance stops: the client hears 421 at its next command (RFC 5321 3.8).
    void shutdown() {
        shutting_down_ = true;
        if (waiting_for_client_) down_.cancel();
    }

private:
    const rules::listener& lcfg() const { return *l_.cfg; }

    // ---- plumbing ------------------------------------------------------------------------
    void say(const std::string& line) {
        out_ += line;
        out_ += "\r\n";
    }
    void say(const smtp::reply& r) { out_ += r.wire(); }

    task<bool> flush() {
        if (out_.empty()) co_return true;
        error_code ec;
        co_await down_.write(asio::buffer(out_), ec);
        out_.clear();
        co_return !ec;
    }

    /// Reads more from the client (replies are flushed first: PIPELINING answers in order,
    /// in as few writes as possible). False on close or timeout (timed_out_ says which).
    task<bool> read_client() {
        if (shutting_down_ || w_.stopping) {
            say("421 4.3.2 " + name_ + " is shutting down; try again later");
            co_return false;
        }
        if (!co_await flush()) co_return false;
        std::size_t room = 0;
        char* p = in_.prepare(4096, room);
        dog_.arm(lcfg().timeouts.command);
        error_code ec;
        waiting_for_client_ = true;
        auto n = co_await down_.read_some(asio::buffer(p, room), ec);
        waiting_for_client_ = false;
        if (ec) {
            timed_out_ = dog_.expired();
            if (shutting_down_ && !timed_out_) say("421 4.3.2 " + name_ + " is shutting down; try again later");
            co_return false;
        }
        in_.commit(n);
        co_return true;
    }

    /// One reply from the upstream. False (with `fault`) on close, timeout or garbage.
    task<bool> read_upstream(smtp::reply& r) {
        while (true) {
            std::size_t used = 0;
            int v = up_->in.empty() ? 0 : smtp::parse_reply(up_->in.data(), r, used);
            if (v == 1) {
                up_->in.consume(used);
                co_return true;
            }
            if (v < 0) {
                upstream_fault_ = "the upstream sent a malformed reply";
                co_return false;
            }
            std::size_t room = 0;
            char* p = up_->in.prepare(4096, room);
            up_dog_->arm(target_->timeouts.read);
            error_code ec;
            auto n = co_await up_->stream.read_some(asio::buffer(p, room), ec);
            if (ec) {
                upstream_fault_ = up_dog_->expired() ? "the upstream did not answer within " +
                                                           std::to_string(target_->timeouts.read.count() / 1000) + " s"
                                                     : "the upstream closed the connection (" + ec.message() + ")";
                co_return false;
            }
            up_->in.commit(n);
        }
    }

    // string_view parameters: a std::string temporary inside a co_await is destroyed twice
    // by GCC 12, so callers pass literals or named strings.
    task<bool> send_upstream(std::string_view line) {
        error_code ec;
        co_await up_->stream.write(asio::buffer(line), ec);
        if (ec) upstream_fault_ = "writing to the upstream failed (" + ec.message() + ")";
        co_return !ec;
    }

    /// A command upstream and its reply.
    task<bool> exchange_upstream(std::string_view line, smtp::reply& r) {
        std::string wire(line);
        wire += "\r\n";
        if (!co_await send_upstream(wire)) co_return false;
        co_return co_await read_upstream(r);
    }

    // ---- the session ---------------------------------------------------------------------
    task<> run() {
        t0_ = clock_type::now();
        bool ok = co_await accept_client();
        if (ok && target_) {
            if (target_->mode == rules::server_mode::tcp)
                co_await pipe();
            else
                co_await converse();
        }
        if (!logged_) {
            // A session without a mail transaction still leaves a trace (probes, garbage,
            // a forged PROXY header from someone untrusted).
            auto r = record();
            r.note = "session without a mail transaction" + (bad_commands_ ? ", " + std::to_string(bad_commands_) + " bad commands" : std::string());
            log(r, t0_);
        }
        co_await flush();
        w_.shutdown_hooks.erase(id_);
        dog_.stop();
        if (up_dog_) up_dog_->stop();
        if (up_) {
            if (target_ && target_->mode == rules::server_mode::smtp && upstream_ready_) co_await send_upstream("QUIT\r\n");
            up_->stream.close();
        }
        down_.close();
    }

    access_record record() {
        access_record r;
        r.protocol = "smtp";
        r.instance = rt_->name;
        r.conn = id_;
        r.client = peer_.to_string();
        r.original_client = client_.to_string();
        r.listener = lcfg().name;
        r.ehlo = ehlo_;
        r.tls = down_.is_tls();
        r.user = user_;
        r.rule = rule_ ? rule_->name : "";
        r.action = "allow";
        r.target = target_ && target_->address ? endpoint_text(*target_->address, target_->port) : "";
        return r;
    }

    void log(access_record& r, clock_type::time_point since) {
        r.duration_ms = std::chrono::duration<double, std::milli>(clock_type::now() - since).count();
        w_.stats.observe(r);
        w_.log.write(r);
        logged_ = true;
    }

    /// PROXY header from a trusted previous tier, the connection-level rule decision, and
    /// the upstream's banner. Returns false when the session ends here.
    task<bool> accept_client() {
        if (rt_->policy->trusts_forwarding_from(peer_)) {
            // The previous tier announces the real client before anything else.
            while (true) {
                smtp::proxy_header h;
                std::string err;
                int v = in_.empty() ? 0 : smtp::parse_proxy_v2(in_.data(), h, err);
                if (v == 1) {
                    in_.consume(h.size);
                    if (!h.local)
                        if (auto a = rules::ip_address::parse(h.source)) client_ = *a;
                    break;
                }
                if (v < 0) {
                    say("421 4.7.0 " + name_ + " expected a PROXY protocol v2 header from " + peer_.to_string() + ": " + err);
                    auto r = record();
                    r.action = "deny";
                    r.fault = make_fault(fault_class::bad_request, 0, err);
                    log(r, t0_);
                    co_return false;
                }
                std::size_t room = 0;
                char* p = in_.prepare(256, room);
                dog_.arm(lcfg().timeouts.head);
                error_code ec;
                auto n = co_await down_.read_some(asio::buffer(p, room), ec);
                if (ec) co_return false;
                in_.commit(n);
            }
        }

        rules::facts f;
        f.listener = lcfg().name;
        f.client = client_;
        f.who = rules::identity::anonymous;
        auto d = rt_->policy->evaluate(f, {.trace = false});
        if (d.result != rules::verdict::allow || !d.matched || !d.matched->to) {
            auto refusal = smtp::connection_refusal(d, name_, client_.to_string());
            say(refusal);
            auto r = record();
            r.rule = d.rule_name;
            r.action = "deny";
            r.fault = d.refusal();
            r.fault.status = 554;
            log(r, t0_);
            co_return false;
        }
        rule_ = d.matched;
        target_ = &*rule_->to;
        co_return co_await open_upstream();
    }

    /// Connects to the target, sends the PROXY header if asked, and (smtp mode) reads the
    /// banner and says EHLO. On failure the client is told with 421 naming this tier.
    task<bool> open_upstream() {
        auto key = "smtp|" + endpoint_text(*target_->address, target_->port);
        rules::fault f;
        up_ = co_await connect_upstream(w_.io, w_.upstream_tls, *target_, key, f);
        auto fail = [&](const std::string& why, fault_class cls) {
            say("421 4.4.1 " + name_ + " (" + rt_->name + "): " + why);
            auto r = record();
            r.action = "allow";
            r.fault = make_fault(cls, 421, why);
            log(r, t0_);
            if (up_) up_->stream.close();
            up_.reset();
        };
        if (!up_) {
            fail(f.detail, f.cls);
            co_return false;
        }
        up_dog_ = std::make_unique<watchdog>(w_.io, up_->stream);
        if (target_->proxy_protocol.value_or(false)) {
            auto hdr = smtp::make_proxy_v2(client_.to_string(), 0, local_addr_, local_port_);
            if (!co_await send_upstream(hdr)) {
                fail(upstream_fault_, fault_class::upstream_connect);
                co_return false;
            }
        }
        if (target_->mode == rules::server_mode::tcp) co_return true;
        smtp::reply banner;
        if (!co_await read_upstream(banner)) {
            fail(upstream_fault_, fault_class::upstream_protocol);
            co_return false;
        }
        if (banner.code != 220) {
            // The next tier refused us (a rule there, or Exchange): its words reach the client.
            say(banner);
            auto r = record();
            r.action = "deny";
            r.fault = make_fault(fault_class::upstream_protocol, banner.code, "the next hop refused the session: " + banner.text());
            r.upstream_reply = std::to_string(banner.code) + " " + banner.text();
            log(r, t0_);
            co_return false;
        }
        smtp::reply ehlo;
        std::string ehlo_line = "EHLO " + name_, helo_line = "HELO " + name_;
        if (!co_await exchange_upstream(ehlo_line, ehlo)) {
            fail(upstream_fault_, fault_class::upstream_protocol);
            co_return false;
        }
        if (ehlo.code != 250) {
            if (!co_await exchange_upstream(helo_line, ehlo) || ehlo.code != 250) {
                fail("the upstream refused EHLO and HELO: " + ehlo.text(), fault_class::upstream_protocol);
                co_return false;
            }
        }
        read_capabilities(ehlo);
        upstream_ready_ = true;
        co_return true;
    }

    void read_capabilities(const smtp::reply& ehlo) {
        up_8bit_ = up_size_ = up_xclient_ = up_pipelining_ = up_chunking_ = false;
        for (std::size_t i = 1; i < ehlo.lines.size(); ++i) {
            auto kw = rules::to_lower(ehlo.lines[i].substr(0, ehlo.lines[i].find(' ')));
            if (kw == "8bitmime") up_8bit_ = true;
            if (kw == "size") up_size_ = true;
            if (kw == "pipelining") up_pipelining_ = true;
            if (kw == "chunking") up_chunking_ = true;
            if (kw == "xclient" && rules::contains_nocase(ehlo.lines[i], "login")) up_xclient_ = true;
        }
    }

    /// Tells the next tier who authenticated, with XCLIENT LOGIN (Postfix's extension) when
    /// it offers it: that tier answers with a new greeting, and EHLO starts over. A next tier
    /// without XCLIENT (Exchange) decides relaying by its own connector permissions.
    task<bool> pass_identity() {
        if (!up_xclient_ || !upstream_ready_) co_return true;
        smtp::reply r;
        std::string line = "XCLIENT LOGIN=" + (user_.empty() ? std::string("[UNAVAILABLE]") : smtp::xtext_encode(user_));
        if (!co_await exchange_upstream(line, r)) co_return false;
        if (r.code != 220) {
            identity_refused_ = std::to_string(r.code) + " " + r.text();
            co_return true;  // the next tier judges the session as anonymous
        }
        smtp::reply ehlo;
        std::string ehlo_line = "EHLO " + name_;
        if (!co_await exchange_upstream(ehlo_line, ehlo)) co_return false;
        if (ehlo.code != 250) {
            upstream_fault_ = "the upstream refused EHLO after XCLIENT: " + ehlo.text();
            co_return false;
        }
        read_capabilities(ehlo);
        co_return true;
    }

    // ---- tcp mode ------------------------------------------------------------------------
    task<> pipe() {
        struct counters {
            std::uint64_t up = 0, down = 0;
        };
        auto n_bytes = std::make_shared<counters>();
        // client -> upstream in its own coroutine; upstream -> client here.
        spawn_guarded(w_, "smtp tcp pipe", [self = shared_from_this(), n_bytes]() -> task<> {
                           error_code ec;
                           if (!self->in_.empty()) {
                               auto d = self->in_.data();
                               co_await self->up_->stream.write(asio::buffer(d.data(), d.size()), ec);
                               n_bytes->up += d.size();
                               self->in_.consume(d.size());
                           }
                           std::array<char, 16384> buf;
                           while (!ec) {
                               self->dog_.arm(self->target_->timeouts.idle);
                               auto n = co_await self->down_.read_some(asio::buffer(buf), ec);
                               if (ec) break;
                               co_await self->up_->stream.write(asio::buffer(buf.data(), n), ec);
                               n_bytes->up += n;
                           }
                           self->up_->stream.shutdown_send();
                       });
        std::array<char, 16384> buf;
        error_code ec;
        while (true) {
            up_dog_->arm(target_->timeouts.idle);
            auto n = co_await up_->stream.read_some(asio::buffer(buf), ec);
            if (ec) break;
            co_await down_.write(asio::buffer(buf.data(), n), ec);
            if (ec) break;
            n_bytes->down += n;
        }
        down_.shutdown_send();
        down_.cancel();
        auto r = record();
        r.bytes_in = n_bytes->up;
        r.bytes_out = n_bytes->down;
        r.note = "tcp mode";
        log(r, t0_);
    }

    // ---- smtp mode -----------------------------------------------------------------------
    void reset_transaction() {
        in_transaction_ = false;
        pending_mail_.clear();
        up_mail_open_ = false;
        chunks_.reset();
        tx_ = access_record{};
        rcpt_count_ = 0;
    }

    /// Logs the open transaction (MAIL ... end of DATA, RSET, QUIT or a drop).
    void close_transaction(const std::string& upstream_reply, const std::string& queue) {
        if (!in_transaction_) return;
        auto r = record();
        r.mail_from = tx_.mail_from;
        r.rcpt_accepted = tx_.rcpt_accepted;
        r.rcpt_refused = tx_.rcpt_refused;
        r.size = tx_.size;
        r.bytes_in = tx_.size;
        r.upstream_reply = upstream_reply;
        r.queue_id = queue;
        const auto& code_from = upstream_reply.empty() ? tx_.fault.detail : upstream_reply;
        r.status = code_from.size() >= 3 && std::isdigit(static_cast<unsigned char>(code_from[0])) ? std::atoi(code_from.substr(0, 3).c_str()) : 0;
        r.fault = tx_.fault;
        if (r.fault) r.fault.status = r.status;
        r.note = tx_.note;
        if (!identity_refused_.empty()) {
            auto& d = r.fault ? r.fault.detail : r.note;
            d += (d.empty() ? "" : "; ") + std::string("the next tier refused XCLIENT: ") + identity_refused_;
        }
        if (r.rcpt_accepted.empty() && !r.rcpt_refused.empty()) r.action = "deny";
        log(r, tx_start_);
        reset_transaction();
    }

    task<> converse() {
        say("220 " + name_ + " ESMTP dmzproxy");
        int bad = 0;
        while (true) {
            std::string_view line;
            std::size_t used = 0;
            auto lr = in_.empty() ? smtp::line_result::need_more : smtp::next_line(in_.data(), smtp::max_command_line, line, used);
            if (lr == smtp::line_result::need_more) {
                if (!co_await read_client()) {
                    if (timed_out_)
                        say("421 4.4.2 " + name_ + " closing: no command within " +
                            std::to_string(lcfg().timeouts.command.count() / 1000) + " s");
                    close_transaction("", "");
                    co_return;
                }
                continue;
            }
            if (lr == smtp::line_result::bare_lf || lr == smtp::line_result::bare_cr) {
                // Framing in doubt: say so and stop, rather than guess where a command ends.
                end_in_doubt("500 5.5.2 " + std::string(lr == smtp::line_result::bare_lf ? "bare LF" : "bare CR") +
                             " in a command; closing");
                co_return;
            }
            if (lr == smtp::line_result::too_long) {
                if (names_bdat(in_.data())) {
                    // Octets follow a BDAT line, and how many is unknown: stop.
                    end_in_doubt("500 5.5.2 Line too long in a BDAT command; closing");
                    co_return;
                }
                say("500 5.5.2 Line too long (the limit is 512 octets)");
                if (!co_await skip_line()) co_return;
                if (++bad >= max_bad_commands) break;
                continue;
            }
            std::string text(line);
            in_.consume(used);
            smtp::command cmd;
            std::string err;
            if (!smtp::parse_command(text, cmd, err)) {
                if (names_bdat(text)) {
                    end_in_doubt("501 5.5.4 Syntax: BDAT <size> [LAST]; closing");
                    co_return;
                }
                say(err);
                ++bad_commands_;
                if (++bad >= max_bad_commands) break;
                continue;
            }
            int r = co_await handle(cmd);
            if (r < 0) co_return;  // the session ends (QUIT, upstream gone)
            if (r == 0) ++bad_commands_;
            if (r == 0 && ++bad >= max_bad_commands) break;
        }
        say("421 4.7.0 " + name_ + " too many errors, closing");
        close_transaction("", "");
    }

    /// The client's bytes can no longer be framed (or are not worth reading): the last
    /// reply, the open transaction logged as a bad request, and the session ends.
    void end_in_doubt(const std::string& reply, const std::string& detail = "") {
        say(reply);
        tx_.fault = make_fault(fault_class::bad_request, 0, detail.empty() ? tx_.fault.detail : detail);
        close_transaction("", "");
    }

    /// A command line that starts with the BDAT verb (octets follow it).
    static bool names_bdat(std::string_view line) {
        if (line.size() < 4 || rules::to_lower(std::string(line.substr(0, 4))) != "bdat") return false;
        return line.size() == 4 || !std::isalnum(static_cast<unsigned char>(line[4]));
    }

    /// Discards client bytes up to the next CRLF (after an over-long line).
    task<bool> skip_line() {
        while (true) {
            auto d = in_.data();
            auto pos = d.find("\r\n");
            if (pos != std::string_view::npos) {
                in_.consume(pos + 2);
                co_return true;
            }
            in_.consume(d.size() > 0 ? d.size() - (d.back() == '\r' ? 1 : 0) : 0);
            if (!co_await read_client()) co_return false;
        }
    }

    std::string capabilities_reply() {
        std::vector<std::string> lines{name_ + " Hello " + ehlo_ + " [" + client_.to_string() + "]",
                                       "SIZE " + std::to_string(lcfg().limits.max_message_size), "PIPELINING", "8BITMIME",
                                       "ENHANCEDSTATUSCODES", "CHUNKING"};
        if (!down_.is_tls() && l_.tls) lines.push_back("STARTTLS");
        if (down_.is_tls() && w_.auth.configured()) lines.push_back("AUTH PLAIN LOGIN");
        if (rt_->policy->trusts_forwarding_from(peer_)) lines.push_back("XCLIENT LOGIN");
        smtp::reply r{250, lines};
        return r.wire();
    }

    /// 1 handled, 0 a client error (counted), -1 end of session.
    task<int> handle(smtp::command& cmd) {
        const auto& v = cmd.verb;
        if (chunks_ && v != "BDAT" && v != "RSET" && v != "QUIT") {
            // A BDAT message in progress holds its chunks: only more chunks, RSET or QUIT
            // (so a client cannot keep them alive with other commands).
            say("503 5.5.1 Only BDAT, RSET or QUIT while a BDAT message is in progress");
            co_return 0;
        }
        if (v == "EHLO" || v == "HELO") {
            if (cmd.argument.empty()) {
                say("501 5.5.4 " + v + " needs a domain or address literal");
                co_return 0;
            }
            if (in_transaction_) {
                // EHLO resets the transaction (RFC 5321 4.1.4): the upstream's too.
                if (!co_await reset_upstream()) co_return co_await upstream_lost();
                close_transaction("", "");
            }
            ehlo_ = cmd.argument.substr(0, cmd.argument.find(' '));
            if (v == "EHLO") out_ += capabilities_reply();
            else say("250 " + name_ + " Hello " + ehlo_ + " [" + client_.to_string() + "]");
            co_return 1;
        }
        if (v == "STARTTLS") co_return co_await starttls(cmd);
        if (v == "AUTH") co_return co_await auth(cmd);
        if (v == "XCLIENT") co_return co_await xclient(cmd);
        if (v == "NOOP") {
            say("250 2.0.0 OK");
            co_return 1;
        }
        if (v == "RSET") {
            if (in_transaction_) {
                if (!co_await reset_upstream()) co_return co_await upstream_lost();
                close_transaction("", "");
            }
            say("250 2.0.0 OK");
            co_return 1;
        }
        if (v == "QUIT") {
            close_transaction("", "");
            say("221 2.0.0 " + name_ + " closing connection");
            co_return -1;
        }
        if (v == "VRFY") {
            say("252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery");
            co_return 1;
        }
        if (v == "HELP") {
            say("214 2.0.0 https://www.rfc-editor.org/rfc/rfc5321");
            co_return 1;
        }
        if (v == "MAIL") co_return co_await mail(cmd);
        if (v == "RCPT") co_return co_await rcpt(cmd);
        if (v == "DATA") co_return co_await data(cmd);
        if (v == "BDAT") co_return co_await bdat(cmd);
        if (v == "EXPN" || v == "TURN" || v == "ETRN") {
            say("502 5.5.1 " + v + " is not implemented");
            co_return 0;
        }
        say("500 5.5.2 Syntax error, command unrecognized");
        co_return 0;
    }

    task<int> starttls(const smtp::command& cmd) {
        if (down_.is_tls()) {
            say("503 5.5.1 TLS already active");
            co_return 0;
        }
        if (!l_.tls) {
            say("502 5.5.1 STARTTLS is not offered on this listener (no certificate)");
            co_return 0;
        }
        if (!cmd.argument.empty()) {
            say("501 5.5.4 STARTTLS takes no argument");
            co_return 0;
        }
        if (in_transaction_) {
            // RFC 3207 resets the session after the handshake; a transaction half-made in
            // the clear (and open upstream) is refused instead, as Postfix does.
            say("503 5.5.1 STARTTLS inside a mail transaction; send RSET first");
            co_return 0;
        }
        say("220 2.0.0 Ready to start TLS");
        if (!co_await flush()) co_return -1;
        // Anything the client pipelined behind STARTTLS was sent in the clear and is not
        // part of the TLS session: discard it (the STARTTLS command injection attack).
        in_.consume(in_.size());
        down_.start_tls(l_.tls->default_context());
        dog_.arm(lcfg().timeouts.head);
        error_code ec;
        co_await down_.handshake(true, ec);
        if (ec) co_return -1;
        // RFC 3207: the client starts over with EHLO.
        ehlo_.clear();
        co_return 1;
    }

    /// One line of an AUTH exchange (RFC 4954 allows 12288 octets). False when the client
    /// went away or the framing is in doubt (the session ends).
    task<bool> auth_line(std::string& out) {
        while (true) {
            std::string_view line;
            std::size_t used = 0;
            auto lr = in_.empty() ? smtp::line_result::need_more : smtp::next_line(in_.data(), 12288, line, used);
            if (lr == smtp::line_result::line) {
                out.assign(line);
                in_.consume(used);
                co_return true;
            }
            if (lr != smtp::line_result::need_more) {
                say("500 5.5.2 Malformed authentication response; closing");
                co_return false;
            }
            if (!co_await read_client()) co_return false;
        }
    }

    /// AUTH PLAIN and LOGIN, over TLS only, against the instance's user store. A locked-out
    /// user hears what a wrong password hears; the log says which it was.
    task<int> auth(const smtp::command& cmd) {
        if (!down_.is_tls()) {
            say("538 5.7.11 Encryption required for requested authentication mechanism (use STARTTLS)");
            co_return 0;
        }
        if (!w_.auth.configured()) {
            say("535 5.7.8 Authentication is not available on this listener (no user store is configured)");
            co_return 0;
        }
        if (!user_.empty()) {
            say("503 5.5.1 Already authenticated");
            co_return 0;
        }
        if (in_transaction_) {
            say("503 5.5.1 AUTH is not permitted during a mail transaction");
            co_return 0;
        }
        auto sp = cmd.argument.find(' ');
        std::string mech;
        for (char c : cmd.argument.substr(0, sp)) mech += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        bool initial = sp != std::string::npos;
        std::string first = initial ? cmd.argument.substr(sp + 1) : std::string();
        auto cancelled = [&](const std::string& l) {
            if (l != "*") return false;
            say("501 5.7.0 Authentication cancelled");
            return true;
        };
        auto decode = [](const std::string& l) { return l == "=" ? std::optional<std::string>("") : base64_decode(l); };
        std::string user, password;
        if (mech == "PLAIN") {
            if (!initial) {
                say("334 ");
                if (!co_await auth_line(first)) co_return -1;
            }
            if (cancelled(first)) co_return 0;
            auto d = decode(first);
            auto c = d ? smtp::parse_sasl_plain(*d) : std::nullopt;
            if (!c) {
                say("501 5.5.2 Malformed PLAIN response");
                co_return 0;
            }
            user = c->user;
            password = c->password;
        } else if (mech == "LOGIN") {
            if (!initial) {
                say("334 VXNlcm5hbWU6");  // "Username:"
                if (!co_await auth_line(first)) co_return -1;
            }
            if (cancelled(first)) co_return 0;
            auto u = decode(first);
            std::string second;
            say("334 UGFzc3dvcmQ6");  // "Password:"
            if (!co_await auth_line(second)) co_return -1;
            if (cancelled(second)) co_return 0;
            auto p = decode(second);
            if (!u || !p || u->empty()) {
                say("501 5.5.2 Malformed LOGIN response");
                co_return 0;
            }
            user = *u;
            password = *p;
        } else {
            say("504 5.5.4 Unrecognized authentication type (PLAIN and LOGIN are offered)");
            co_return 0;
        }
        auto r = co_await w_.auth.check(user, password, lcfg().name, client_, lcfg().lockout);
        if (!r.ok) {  // RFC 4954: 454 when the password checks are saturated
            say(r.overloaded ? "454 4.7.0 Temporary authentication failure" : "535 5.7.8 Authentication credentials invalid");
            auto rec = record();
            rec.user = user;
            rec.action = "deny";
            rec.status = r.overloaded ? 454 : 535;
            rec.fault = make_fault(r.overloaded ? fault_class::overloaded : fault_class::auth_failed, rec.status, "AUTH " + mech + " refused for '" + user + "' (" + r.refusal + ")");
            log(rec, clock_type::now());
            co_return 0;
        }
        user_ = r.user;
        say("235 2.7.0 Authentication successful");
        if (!co_await pass_identity()) co_return co_await upstream_lost();
        co_return 1;
    }

    /// XCLIENT LOGIN from a trusted previous tier: the user that tier authenticated. The
    /// reply is a new greeting (as Postfix does); the client says EHLO again.
    task<int> xclient(const smtp::command& cmd) {
        if (!rt_->policy->trusts_forwarding_from(peer_)) {
            say("550 5.7.0 XCLIENT is accepted only from a trusted previous tier");
            co_return 0;
        }
        if (in_transaction_) {
            say("503 5.5.1 XCLIENT is not permitted during a mail transaction");
            co_return 0;
        }
        std::optional<std::string> login;
        std::string_view rest = cmd.argument;
        while (!rest.empty()) {
            auto sp = rest.find(' ');
            auto tok = rest.substr(0, sp);
            rest = sp == std::string_view::npos ? std::string_view() : rest.substr(sp + 1);
            if (tok.empty()) continue;
            auto eq = tok.find('=');
            if (eq == std::string_view::npos) {
                say("501 5.5.4 Bad XCLIENT attribute");
                co_return 0;
            }
            if (rules::to_lower(std::string(tok.substr(0, eq))) != "login") continue;  // NAME, ADDR, ...: PROXY says those
            auto val = tok.substr(eq + 1);
            if (val == "[UNAVAILABLE]" || val == "[TEMPUNAVAIL]") {
                login = "";
            } else if (auto d = smtp::xtext_decode(val)) {
                login = *d;
            } else {
                say("501 5.5.4 Bad XCLIENT LOGIN value");
                co_return 0;
            }
        }
        if (login) user_ = *login;
        ehlo_.clear();
        say("220 " + name_ + " ESMTP dmzproxy");
        if (!co_await pass_identity()) co_return co_await upstream_lost();
        co_return 1;
    }

    task<int> mail(const smtp::command& cmd) {
        if (ehlo_.empty()) {
            say("503 5.5.1 Send EHLO or HELO first");
            co_return 0;
        }
        if (in_transaction_) {
            say("503 5.5.1 Nested MAIL command");
            co_return 0;
        }
        std::string up_line = "MAIL FROM:<" + cmd.path + ">";
        for (auto& [k, val] : cmd.params) {
            if (k == "SIZE") {
                std::uint64_t n = 0;
                auto [p, ec] = std::from_chars(val.data(), val.data() + val.size(), n);
                if (ec != std::errc{} || p != val.data() + val.size()) {
                    say("501 5.5.4 Bad SIZE parameter");
                    co_return 0;
                }
                if (n > lcfg().limits.max_message_size) {
                    say("552 5.3.4 Message size exceeds fixed maximum message size (" +
                        std::to_string(lcfg().limits.max_message_size) + ")");
                    co_return 0;
                }
                if (up_size_) up_line += " SIZE=" + val;
            } else if (k == "BODY") {
                auto b = rules::to_lower(val);
                if (b != "8bitmime" && b != "7bit") {
                    say("501 5.5.4 Bad BODY parameter");
                    co_return 0;
                }
                if (up_8bit_) up_line += b == "7bit" ? " BODY=7BIT" : " BODY=8BITMIME";
            } else {
                say("555 5.5.4 Unsupported parameter " + k);
                co_return 0;
            }
        }
        if (!cmd.path.empty()) {
            auto trick = rules::relay_trick(cmd.path);
            if (cmd.path.size() > 256 || trick == "a local part longer than 64 octets" || trick == "a domain longer than 255 octets") {
                say("553 5.1.7 Bad sender address syntax (" + (trick.empty() ? std::string("too long") : trick) + ")");
                co_return 0;
            }
        }
        // The upstream hears MAIL with the first recipient this tier lets through: one round
        // trip fewer per message, and none at all for a transaction refused here.
        in_transaction_ = true;
        tx_start_ = clock_type::now();
        tx_.mail_from = cmd.path;
        pending_mail_ = std::move(up_line);
        say("250 2.1.0 Sender OK");
        co_return 1;
    }

    /// Sends the transaction's MAIL upstream with a RCPT (one write when the upstream offers
    /// PIPELINING). False when the upstream is gone. Otherwise `mail` is the upstream's
    /// answer to MAIL and, when that was 2xx, `r` its answer to the RCPT.
    task<bool> mail_and_rcpt(const std::string& rcpt_line, smtp::reply& mail, smtp::reply& r) {
        std::string wire = pending_mail_ + "\r\n";
        if (up_pipelining_) wire += rcpt_line + "\r\n";
        up_mail_open_ = true;
        if (!co_await send_upstream(wire)) co_return false;
        if (!co_await read_upstream(mail)) co_return false;
        if (mail.code == 421) co_return true;  // closing: no answer to the RCPT will come
        if (up_pipelining_) {
            // Read even after a refused MAIL: the upstream answers every pipelined command.
            if (!co_await read_upstream(r)) co_return false;
        } else if (mail.code / 100 == 2) {
            if (!co_await exchange_upstream(rcpt_line, r)) co_return false;
        }
        if (mail.code / 100 == 2) pending_mail_.clear();
        co_return true;
    }

    /// A RCPT upstream, with the transaction's MAIL before it when that is still pending.
    /// 1: `r` is the upstream's answer. 0: the upstream refused the sender, and the client
    /// has that answer. -1: the upstream is gone. -2: it said 421, so the session ends.
    task<int> forward_rcpt(const std::string& path, const std::string& rcpt_line, smtp::reply& r) {
        if (pending_mail_.empty()) co_return co_await exchange_upstream(rcpt_line, r) ? 1 : -1;
        smtp::reply m;
        if (!co_await mail_and_rcpt(rcpt_line, m, r)) co_return -1;
        if (m.code / 100 == 2) co_return 1;
        // The refused sender is this recipient's answer; the next RCPT tries MAIL again.
        // A 552 (message size) would read as "try later" at RCPT (RFC 5321 4.5.3.1.10),
        // so it is passed on as 550 with the same words.
        if (m.code == 552) m.code = 550;
        if (!relay_reply(m)) co_return -2;
        auto why = std::to_string(m.code) + " " + m.text();
        tx_.rcpt_refused.emplace_back(path, why);
        tx_.note = "the upstream refused MAIL FROM: " + why;
        co_return 0;
    }

    /// RSET upstream when the upstream has a transaction open. False when it is gone.
    task<bool> reset_upstream() {
        if (!up_mail_open_) co_return true;
        smtp::reply r;
        co_return co_await exchange_upstream("RSET", r);
    }

    task<int> rcpt(const smtp::command& cmd) {
        if (!in_transaction_) {
            say("503 5.5.1 Need MAIL before RCPT");
            co_return 0;
        }
        if (rcpt_count_ >= lcfg().limits.max_recipients) {
            say("452 4.5.3 Too many recipients");
            co_return 1;
        }
        auto refuse = [&](const std::string& reply) {
            say(reply);
            tx_.rcpt_refused.emplace_back(cmd.path, reply);
        };
        if (cmd.path.empty()) {
            refuse("553 5.1.3 An empty recipient is not a mailbox");
            co_return 0;
        }
        auto trick = rules::relay_trick(cmd.path);
        if (trick == "a local part longer than 64 octets" || trick == "a domain longer than 255 octets") {
            refuse("553 5.1.3 Bad recipient address syntax (" + trick + ")");
            co_return 0;
        }
        for (auto& [k, val] : cmd.params) {
            (void)val;
            refuse("555 5.5.4 Unsupported parameter " + k);
            co_return 0;
        }
        rules::facts f;
        f.listener = lcfg().name;
        f.client = client_;
        f.who = user_.empty() ? rules::identity::anonymous : rules::identity::authenticated;
        f.user = user_;
        f.mail_from = tx_.mail_from;
        f.rcpt = cmd.path;
        auto d = rt_->policy->evaluate(f, {.trace = false});
        if (d.result != rules::verdict::allow) {
            auto reason = smtp::recipient_refusal(d);
            refuse(reason);
            tx_.fault = make_fault(fault_class::rule_denied, 550, tx_.fault.detail, d.rule_name);
            co_return 1;
        }
        smtp::reply r;
        std::string rcpt_line = "RCPT TO:<" + cmd.path + ">";
        int sent = co_await forward_rcpt(cmd.path, rcpt_line, r);
        if (sent == -1) co_return co_await upstream_lost();
        if (sent < 0) co_return -1;
        if (sent == 0) co_return 1;
        if (!relay_reply(r)) co_return -1;
        if (r.code / 100 == 2) {
            ++rcpt_count_;
            tx_.rcpt_accepted.push_back(cmd.path);
        } else {
            tx_.rcpt_refused.emplace_back(cmd.path, std::to_string(r.code) + " " + r.text());
        }
        co_return 1;
    }

    task<int> data(const smtp::command& cmd) {
        if (!in_transaction_) {
            say("503 5.5.1 Need MAIL before DATA");
            co_return 0;
        }
        if (tx_.rcpt_accepted.empty()) {
            say("554 5.5.1 No valid recipients");
            co_return 0;
        }
        if (!cmd.argument.empty()) {
            say("501 5.5.4 DATA takes no argument");
            co_return 0;
        }
        say("354 Start mail input; end with <CRLF>.<CRLF>");
        smtp::data_reader reader(lcfg().limits.max_message_size);
        while (true) {
            if (!in_.empty()) {
                auto used = reader.feed(in_.data());
                in_.consume(used);
                if (reader.done()) break;
            }
            if (!co_await read_client()) {
                // The client vanished mid-message: nothing was forwarded, nothing is lost.
                tx_.fault = make_fault(fault_class::bad_request, 0, timed_out_ ? "timed out in DATA" : "the client closed in DATA");
                close_transaction("", "");
                co_return -1;
            }
        }
        tx_.size = reader.size();
        if (!reader.refusal().empty()) {
            say(reader.refusal());
            tx_.fault = make_fault(fault_class::bad_request, 0, reader.refusal());
            smtp::reply r;
            if (!co_await exchange_upstream("RSET", r)) co_return co_await upstream_lost();
            close_transaction("", "");  // this tier refused it: the refusal is in `detail`
            co_return 1;
        }
        std::string msg = reader.take_message();
        co_return co_await deliver(msg, false);
    }

    /// BDAT (RFC 3030): exactly <size> octets follow the command, whatever its answer, so
    /// they are always read (and dropped when refused) to stay in step with the client.
    task<int> bdat(const smtp::command& cmd) {
        std::string_view arg = cmd.argument;
        auto sp = arg.find(' ');
        auto num = arg.substr(0, sp);
        std::uint64_t size = 0;
        auto [end, err] = std::from_chars(num.data(), num.data() + num.size(), size);
        bool ok = !num.empty() && num.size() <= 18 && err == std::errc{} && end == num.data() + num.size();
        bool last = false;
        if (ok && sp != std::string_view::npos) ok = last = rules::to_lower(std::string(arg.substr(sp + 1))) == "last";
        if (!ok) {
            // How many octets follow is unknown: framing in doubt, so say so and stop.
            end_in_doubt("501 5.5.4 Syntax: BDAT <size> [LAST]; closing", "a malformed BDAT command");
            co_return -1;
        }
        if (size > lcfg().limits.max_message_size) {
            // Reading and dropping that many octets is no use to anyone: refuse and stop.
            end_in_doubt("552 5.3.4 A chunk bigger than the maximum message size (" +
                             std::to_string(lcfg().limits.max_message_size) + "); closing",
                         "a BDAT chunk of " + std::to_string(size) + " octets");
            co_return -1;
        }
        std::string refusal;
        if (!in_transaction_) refusal = "503 5.5.1 Need MAIL before BDAT";
        else if (tx_.rcpt_accepted.empty()) refusal = "554 5.5.1 No valid recipients";
        else if (chunks_ && !chunks_->refusal().empty()) refusal = "503 5.5.1 An earlier BDAT of this transaction failed; send RSET";
        bool take = refusal.empty();
        if (take && !chunks_) chunks_.emplace(lcfg().limits.max_message_size, true);
        for (std::uint64_t left = size; left > 0;) {
            if (in_.empty() && !co_await read_client()) {
                // The client vanished mid-message: nothing was forwarded, nothing is lost.
                tx_.fault = make_fault(fault_class::bad_request, 0, timed_out_ ? "timed out in BDAT" : "the client closed in BDAT");
                close_transaction("", "");
                co_return -1;
            }
            auto data = in_.data();
            auto n = static_cast<std::size_t>(std::min<std::uint64_t>(left, data.size()));
            if (take) chunks_->feed(data.substr(0, n));
            in_.consume(n);
            left -= n;
        }
        if (!take) {
            say(refusal);
            co_return 0;
        }
        if (last) chunks_->finish();
        if (!chunks_->refusal().empty()) {
            // Too big, a bare CR or LF, a long line: the message is refused, never forwarded.
            say(chunks_->refusal());
            tx_.fault = make_fault(fault_class::bad_request, 0, chunks_->refusal());
            tx_.size = chunks_->size();
            if (!last) co_return 1;  // the client should RSET; further chunks are refused
            if (!co_await reset_upstream()) co_return co_await upstream_lost();
            close_transaction("", "");
            co_return 1;
        }
        if (!last) {
            say("250 2.0.0 " + std::to_string(size) + " octets received");
            co_return 1;
        }
        tx_.size = chunks_->size();
        std::string msg = chunks_->take_message();
        co_return co_await deliver(msg, true);
    }

    /// Sends a whole, checked message upstream and gives the client the upstream's answer.
    /// By BDAT when the upstream offers CHUNKING (one write, one reply), else by DATA.
    /// `raw`: the message came by BDAT; otherwise it is in DATA's wire form (dot-stuffed).
    task<int> deliver(std::string& msg, bool raw) {
        smtp::reply r;
        error_code ec;
        if (up_chunking_) {
            if (!raw) smtp::dot_unstuff_in_place(msg);
            std::string head = "BDAT " + std::to_string(msg.size()) + " LAST\r\n";
            std::array<asio::const_buffer, 2> bufs{asio::buffer(head), asio::buffer(msg)};
            co_await up_->stream.write(bufs, ec);
        } else {
            if (!co_await exchange_upstream("DATA", r)) co_return co_await upstream_lost();
            if (r.code != 354) {
                if (!relay_reply(r)) co_return -1;
                if (!co_await reset_upstream()) co_return co_await upstream_lost();
                close_transaction(std::to_string(r.code) + " " + r.text(), "");
                co_return 1;
            }
            if (raw) smtp::dot_stuff_in_place(msg);
            std::array<asio::const_buffer, 2> bufs{asio::buffer(msg), asio::buffer(".\r\n", 3)};
            co_await up_->stream.write(bufs, ec);
        }
        if (ec) {
            upstream_fault_ = "writing the message to the upstream failed (" + ec.message() + ")";
            co_return co_await upstream_lost();
        }
        if (!co_await read_upstream(r)) co_return co_await upstream_lost();
        // The upstream's answer is the client's answer: 250 only if it took the message.
        if (!relay_reply(r)) co_return -1;
        close_transaction(std::to_string(r.code) + " " + r.text(), r.code / 100 == 2 ? smtp::queue_id(r) : "");
        if (up_chunking_ && r.code / 100 != 2) {
            // A refused BDAT leaves the upstream's transaction to be reset (RFC 3030 2); the
            // transaction is logged already, so this RSET goes out unconditionally.
            smtp::reply rr;
            if (!co_await exchange_upstream("RSET", rr)) co_return co_await upstream_lost();
        }
        co_return 1;
    }

    /// Passes an upstream reply on. A 421 from the next tier closes that tier's session,
    /// so this one ends too (RFC 5321 3.8): the client must not sit on a dead session.
    bool relay_reply(const smtp::reply& r) {
        say(r);
        if (r.code != 421) return true;
        upstream_ready_ = false;
        tx_.fault = make_fault(fault_class::upstream_protocol, r.code, "the upstream closed the session: " + r.text());
        close_transaction(std::to_string(r.code) + " " + r.text(), "");
        return false;
    }

    /// The upstream went away mid-session: tell the client (4xx, so it retries later) and
    /// end the session; a message not yet accepted upstream was not accepted here either.
    task<int> upstream_lost() {
        say("421 4.4.2 " + name_ + " (" + rt_->name + "): " + upstream_fault_ + "; try again later");
        tx_.fault = make_fault(fault_class::upstream_protocol, 421, upstream_fault_);
        close_transaction("", "");
        upstream_ready_ = false;
        co_return -1;
    }

    worker& w_;
    std::shared_ptr<const instance_runtime> rt_;
    const listener_runtime& l_;
    stream down_;
    watchdog dog_;
    std::string counted_as_;  ///< the listener whose open-connection gauge counts this one
    std::uint64_t id_;
    rules::ip_address peer_, client_;
    std::string local_addr_;
    std::uint16_t local_port_ = 0;
    std::string name_;
    flat_buffer in_{4096};
    std::string out_;
    bool timed_out_ = false, shutting_down_ = false, waiting_for_client_ = false, logged_ = false;
    int bad_commands_ = 0;
    clock_type::time_point t0_, tx_start_;

    const rules::rule* rule_ = nullptr;
    const rules::target* target_ = nullptr;
    std::shared_ptr<upstream_conn> up_;
    std::unique_ptr<watchdog> up_dog_;
    std::string upstream_fault_;
    bool upstream_ready_ = false, up_8bit_ = false, up_size_ = false, up_xclient_ = false, up_pipelining_ = false,
         up_chunking_ = false;
    std::string identity_refused_;  ///< the next tier's answer to XCLIENT, when it said no

    std::string ehlo_, user_;
    bool in_transaction_ = false;
    /// The transaction's MAIL command, not yet sent upstream (it goes with the first RCPT).
    std::string pending_mail_;
    /// MAIL went upstream in this transaction (accepted or not): RSET resets it there.
    bool up_mail_open_ = false;
    /// The BDAT chunks of this transaction so far. Once its reader has refused the message,
    /// further chunks are refused until RSET.
    std::optional<smtp::data_reader> chunks_;
    std::uint64_t rcpt_count_ = 0;
    access_record tx_;
};

}  // namespace


void start_smtp_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, tcp::socket s) {
    std::make_shared<smtp_session>(w, std::move(rt), l, std::move(s))->start();
}

}  // namespace dmz::proxy
