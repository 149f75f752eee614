// One SMTP client connection. In `smtp` mode the session moves bytes and the SMTP machine
// (smtp/machine.hpp) decides: this file reads and frames what the client sends, writes the
// replies, runs STARTTLS and talks to the upstream as the machine asks. In `tcp` mode it is
// a byte pipe (TMG's server publishing).
#include <algorithm>

#include "dmz/proxy/smtp/machine.hpp"
#include "dmz/proxy/smtp/parser.hpp"
#include "dmz/proxy/smtp/replies.hpp"
#include "net/pipe.hpp"
#include "runtime.hpp"

namespace dmz::proxy {

using namespace net;
using clock_type = std::chrono::steady_clock;

namespace {

class smtp_session : public std::enable_shared_from_this<smtp_session>, private smtp::callbacks {
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
        down_.set_faults(w.faults);
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
            int bad = machine_ ? machine_->bad_commands() : 0;
            r.note = "session without a mail transaction" + (bad ? ", " + std::to_string(bad) + " bad commands" : std::string());
            write_log(r, t0_);
        }
        co_await flush();
        w_.shutdown_hooks.erase(id_);
        dog_.stop();
        if (up_dog_) up_dog_->stop();
        if (up_) {
            if (target_ && target_->mode == rules::server_mode::smtp && machine_ && machine_->upstream_ready()) co_await send_upstream("QUIT\r\n");
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
        r.ehlo = machine_ ? machine_->ehlo() : std::string();
        r.tls = down_.is_tls();
        r.user = machine_ ? machine_->user() : std::string();
        r.rule = rule_ ? rule_->name : "";
        r.action = "allow";
        r.target = target_ && target_->address ? endpoint_text(*target_->address, target_->port) : "";
        return r;
    }

    void write_log(access_record& r, clock_type::time_point since) {
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
                    write_log(r, t0_);
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
        f.client = client_;
        f.who = rules::identity::anonymous;
        auto d = rt_->policy->evaluate(l_.id, f, {.trace = false});
        if (d.result != rules::verdict::allow || !d.matched || !d.matched->to) {
            auto refusal = smtp::connection_refusal(d, name_, client_.to_string());
            say(refusal);
            auto r = record();
            r.rule = d.rule_name;
            r.action = "deny";
            r.fault = d.refusal();
            r.fault.status = 554;
            write_log(r, t0_);
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
        up_ = co_await connect_upstream(w_.io, w_.upstream_tls, *target_, key, f, down_.faults());
        auto fail = [&](const std::string& why, fault_class cls) {
            say("421 4.4.1 " + name_ + " (" + rt_->name + "): " + why);
            auto r = record();
            r.action = "allow";
            r.fault = make_fault(cls, 421, why);
            write_log(r, t0_);
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
            write_log(r, t0_);
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
        up_caps_ = smtp::parse_capabilities(ehlo);
        co_return true;
    }

    // ---- tcp mode ------------------------------------------------------------------------
    task<> pipe() {
        struct counters {
            std::uint64_t up = 0, down = 0;
            bool up_failed = false, up_to_failed = false;  ///< how the client -> upstream leg ended
            std::string up_error;
        };
        auto n_bytes = std::make_shared<counters>();
        // client -> upstream in its own coroutine; upstream -> client here. Both through
        // net::pipe (a kernel pipe between plain sockets).
        spawn_guarded(w_, "smtp tcp pipe", [self = shared_from_this(), n_bytes]() -> task<> {
            error_code ec;
            auto idle = self->target_->timeouts.idle;
            net::pipe_leg leg{.from = self->down_, .to = self->up_->stream, .pending = self->in_, .left = net::until_eof,
                              .moved = n_bytes->up, .before_read = [s = self.get(), idle] { s->dog_.arm(idle); }};
            bool leg_ok = co_await net::pipe(leg, ec);
            if (!leg_ok) n_bytes->up_failed = true, n_bytes->up_to_failed = leg.to_failed, n_bytes->up_error = ec.message();
            self->up_->stream.shutdown_send();
        });
        error_code ec;
        auto idle = target_->timeouts.idle;
        net::pipe_leg leg{.from = up_->stream, .to = down_, .pending = up_->in, .left = net::until_eof, .moved = n_bytes->down,
                          .before_read = [this, idle] { up_dog_->arm(idle); }};
        bool ok = co_await net::pipe(leg, ec);
        down_.shutdown_send();
        down_.cancel();
        auto r = record();
        r.bytes_in = n_bytes->up;
        r.bytes_out = n_bytes->down;
        r.note = "tcp mode";
        // The upstream ending its side is the normal end; anything else is a fault with a side.
        if (!ok && leg.to_failed)
            r.fault = make_fault(fault_class::bad_request, 0, "tcp mode: the client connection failed (" + ec.message() + ")");
        else if (!ok && up_dog_->expired())
            r.fault = make_fault(fault_class::upstream_timeout, 0,
                                 "tcp mode: the upstream sent nothing for " + std::to_string(idle.count() / 1000) + " s");
        else if (!ok)
            r.fault = make_fault(fault_class::upstream_protocol, 0, "tcp mode: the upstream connection failed (" + ec.message() + ")");
        // The upstream ended because the other leg failed: that leg's failure is the fault.
        else if (n_bytes->up_failed && n_bytes->up_to_failed)
            r.fault = make_fault(fault_class::upstream_protocol, 0, "tcp mode: sending to the upstream failed (" + n_bytes->up_error + ")");
        else if (n_bytes->up_failed)
            r.fault = make_fault(fault_class::bad_request, 0, "tcp mode: the client connection failed (" + n_bytes->up_error + ")");
        write_log(r, t0_);
    }

    // ---- smtp mode: bytes in and out, the machine decides ---------------------------------
    task<> converse() {
        smtp::session_facts f;
        f.name = name_;
        f.instance = rt_->name;
        f.listener = lcfg().name;
        f.client = client_;
        f.max_message_size = lcfg().limits.max_message_size;
        f.max_recipients = lcfg().limits.max_recipients;
        f.command_timeout = lcfg().timeouts.command;
        f.tls_offered = l_.tls != nullptr;
        f.tls_active = down_.is_tls();
        f.trusted_peer = rt_->policy->trusts_forwarding_from(peer_);
        f.upstream = up_caps_;
        machine_ = smtp::make_machine(std::move(f), *this);
        smtp::step s = machine_->start();
        while (s.next != smtp::action::end) {
            out_ += machine_->take_replies();
            smtp::step next = co_await perform(s);
            s = std::move(next);
        }
        out_ += machine_->take_replies();
    }

    /// The I/O a step asks for; the machine's next step. An if-chain, not a switch: with
    /// co_awaits in switch cases, GCC 12 built a coroutine that crashed when resumed.
    task<smtp::step> perform(smtp::step& s) {
        using smtp::action;
        smtp::step next = smtp::next_io(action::end);
        if (s.next == action::read_command) {
            next = co_await next_command();
        } else if (s.next == action::skip_line) {
            bool skipped = co_await skip_line();
            next = skipped ? machine_->on_line_skipped() : machine_->on_client_closed(timed_out_);
        } else if (s.next == action::read_auth_line) {
            next = co_await auth_line();
        } else if (s.next == action::check_credentials) {
            next = co_await check_credentials(s.user, s.password);
        } else if (s.next == action::start_tls) {
            next = co_await start_tls();
        } else if (s.next == action::read_data) {
            next = co_await read_data();
        } else if (s.next == action::read_chunk) {
            next = co_await read_chunk(s.chunk_size);
        } else if (s.next == action::upstream) {
            next = co_await upstream(s.up);
        }
        co_return next;
    }

    /// The user store's answer, checked on the auth pool (never on this worker's loop).
    task<smtp::step> check_credentials(const std::string& user, const std::string& password) {
        std::string listener = lcfg().name;  // copies: a reload may replace the config meanwhile
        rules::lockout_policy policy = lcfg().lockout;
        auto r = co_await w_.auth.check(user, password, listener, client_, policy);
        smtp::login_result lr{.ok = r.ok, .user = r.user, .refusal = r.refusal, .overloaded = r.overloaded};
        co_return machine_->on_credentials(lr);
    }

    /// Frames and parses the next command line.
    task<smtp::step> next_command() {
        while (true) {
            std::string_view line;
            std::size_t used = 0;
            auto lr = in_.empty() ? smtp::line_result::need_more : smtp::next_line(in_.data(), smtp::max_command_line, line, used);
            if (lr == smtp::line_result::need_more) {
                if (!co_await read_client()) co_return machine_->on_client_closed(timed_out_);
                continue;
            }
            if (lr != smtp::line_result::line) co_return machine_->on_bad_line(lr, in_.data());
            std::string text(line);
            in_.consume(used);
            smtp::command cmd;
            std::string err;
            if (!smtp::parse_command(text, cmd, err)) co_return machine_->on_syntax_error(text, err);
            co_return machine_->on_command(cmd);
        }
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

    /// One line of an AUTH exchange.
    task<smtp::step> auth_line() {
        while (true) {
            std::string_view line;
            std::size_t used = 0;
            auto lr = in_.empty() ? smtp::line_result::need_more : smtp::next_line(in_.data(), smtp::max_auth_line, line, used);
            if (lr == smtp::line_result::line) {
                std::string text(line);
                in_.consume(used);
                co_return machine_->on_auth_line(text);
            }
            if (lr != smtp::line_result::need_more) co_return machine_->on_auth_line_malformed();
            if (!co_await read_client()) co_return machine_->on_client_closed(timed_out_);
        }
    }

    task<smtp::step> start_tls() {
        if (!co_await flush()) co_return machine_->on_client_closed(false);
        // Anything the client pipelined behind STARTTLS was sent in the clear and is not
        // part of the TLS session: discard it (the STARTTLS command injection attack).
        in_.consume(in_.size());
        down_.start_tls(l_.tls->default_context());
        dog_.arm(lcfg().timeouts.head);
        error_code ec;
        co_await down_.handshake(true, ec);
        if (ec) co_return machine_->on_client_closed(false);
        co_return machine_->on_tls_started();
    }

    task<smtp::step> read_data() {
        while (true) {
            if (!in_.empty()) {
                auto used = machine_->feed_data(in_.data());
                in_.consume(used);
                if (machine_->data_complete()) co_return machine_->on_data_end();
            }
            if (!co_await read_client()) co_return machine_->on_client_closed(timed_out_);
        }
    }

    /// Exactly `size` octets of a BDAT chunk, whatever the machine makes of them.
    task<smtp::step> read_chunk(std::uint64_t size) {
        for (std::uint64_t left = size; left > 0;) {
            if (in_.empty() && !co_await read_client()) co_return machine_->on_client_closed(timed_out_);
            auto data = in_.data();
            auto n = static_cast<std::size_t>(std::min<std::uint64_t>(left, data.size()));
            machine_->feed_chunk(data.substr(0, n));
            in_.consume(n);
            left -= n;
        }
        co_return machine_->on_chunk_end();
    }

    /// Writes what the machine has for the upstream (if anything) and reads one reply.
    task<smtp::step> upstream(const smtp::upstream_write& w) {
        if (!w.head.empty() || !w.body.empty() || !w.tail.empty()) {
            error_code ec;
            if (w.body.empty() && w.tail.empty()) {
                co_await up_->stream.write(asio::buffer(w.head), ec);
            } else if (w.tail.empty()) {
                std::array<asio::const_buffer, 2> bufs{asio::buffer(w.head), asio::buffer(w.body)};
                co_await up_->stream.write(bufs, ec);
            } else {
                std::array<asio::const_buffer, 2> bufs{asio::buffer(w.body), asio::buffer(w.tail.data(), w.tail.size())};
                co_await up_->stream.write(bufs, ec);
            }
            if (ec) {
                upstream_fault_ = std::string(w.message ? "writing the message to the upstream failed (" : "writing to the upstream failed (") +
                                  ec.message() + ")";
                co_return machine_->on_upstream_lost(upstream_fault_);
            }
        }
        smtp::reply r;
        if (!co_await read_upstream(r)) co_return machine_->on_upstream_lost(upstream_fault_);
        co_return machine_->on_upstream_reply(r);
    }

    // ---- smtp::callbacks -----------------------------------------------------------------
    rules::decision evaluate(const rules::facts& f) override { return rt_->policy->evaluate(l_.id, f, {.trace = false}); }

    bool auth_configured() override { return w_.auth.configured(); }

    std::optional<std::string> base64_decode(const std::string& in) override { return proxy::base64_decode(in); }

    void log(const smtp::log_entry& e) override {
        auto r = record();
        r.user = e.user;
        r.ehlo = e.ehlo;
        r.action = e.denied ? "deny" : "allow";
        r.mail_from = e.mail_from;
        r.rcpt_accepted = e.rcpt_accepted;
        r.rcpt_refused = e.rcpt_refused;
        r.size = e.size;
        r.bytes_in = e.size;
        r.status = e.status;
        r.upstream_reply = e.upstream_reply;
        r.queue_id = e.queue_id;
        r.fault = e.fault;
        r.note = e.note;
        write_log(r, e.since);
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
    clock_type::time_point t0_;

    const rules::rule* rule_ = nullptr;
    const rules::target* target_ = nullptr;
    std::shared_ptr<upstream_conn> up_;
    std::unique_ptr<watchdog> up_dog_;
    std::string upstream_fault_;
    smtp::upstream_capabilities up_caps_;  ///< what the upstream offered to the first EHLO
    std::unique_ptr<smtp::machine> machine_;  ///< smtp mode, once the upstream is open
};

}  // namespace


void start_smtp_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, tcp::socket s) {
    std::make_shared<smtp_session>(w, std::move(rt), l, std::move(s))->start();
}

}  // namespace dmz::proxy
