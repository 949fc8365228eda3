// Runs the Java blocks of docs/drivers.md (compiled into Recipes by
// make_java.py) and checks what they do: java DriverTest SECTION, where
// SECTION is jdbc or pgbouncer-jdbc. Prints "RAN <block>", "PASS <check>"
// and "FAIL <check>: <why>" lines, as run_python.py does.
import java.net.URI;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Random;
import java.util.UUID;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

public final class DriverTest {
    static final long RUN_ID = Long.parseLong(System.getenv("RUN_ID"));
    static final int LIMIT = 10_000;
    // (order number, amount, deliveries), as in common.py
    static final int[][] ORDERS = {{1, 500, 3}, {2, 1200, 1}, {3, 15000, 2}, {4, 700, 2}, {5, 900, 3}, {6, 300, 1}};
    static int failed = 0;

    interface Check { String run() throws Exception; }

    static void check(String name, Check fn) {
        try {
            String detail = fn.run();
            System.out.println("PASS " + name + (detail != null ? " (" + detail + ")" : ""));
        } catch (Throwable e) {
            failed++;
            StringBuilder sb = new StringBuilder(e.toString());
            StackTraceElement[] st = e.getStackTrace();
            for (int i = 0; i < Math.min(6, st.length); i++) sb.append("\n    at ").append(st[i]);
            System.out.println("FAIL " + name + ": " + sb);
        }
        System.out.flush();
    }

    static void expect(boolean cond, String why) {
        if (!cond) throw new AssertionError(why);
    }

    interface Action { void run() throws Exception; }

    static SQLException expectState(String state, Action action) throws Exception {
        try {
            action.run();
        } catch (SQLException e) {
            expect(state.equals(e.getSQLState()), "expected SQLSTATE " + state + ", got " + e.getSQLState() + ": " + e);
            return e;
        }
        throw new AssertionError("expected SQLSTATE " + state + ", got no error");
    }

    /** postgresql://user@host:port/db -> {jdbc:postgresql://host:port/db, user} */
    static String[] jdbc(String url) {
        URI u = URI.create(url);
        return new String[] {"jdbc:postgresql://" + u.getHost() + ":" + u.getPort() + u.getPath(), u.getUserInfo()};
    }

    static final String[] ADMIN = jdbc(System.getenv("DATABASE_URL"));
    static final String[] APP = jdbc(System.getenv("APP_URL"));

    static Properties user(String[] url) {
        Properties p = new Properties();
        p.setProperty("user", url[1]);
        return p;
    }

    static Connection admin() throws SQLException {
        return DriverManager.getConnection(ADMIN[0], user(ADMIN)); // autocommit
    }

    static long orderBase(int driverNo) {
        return RUN_ID * 10000 + driverNo * 100L;
    }

    static String uniqueKey(String prefix) {
        return "drivers:" + prefix + ":" + UUID.randomUUID();
    }

    static long count(String sql, Object... params) throws SQLException {
        try (Connection c = admin(); PreparedStatement ps = c.prepareStatement(sql)) {
            for (int i = 0; i < params.length; i++) ps.setObject(i + 1, params[i]);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getLong(1);
            }
        }
    }

    /** One delivery: {outcome, status, result}. */
    interface Attempt { String[] run(long orderId, int amount) throws Exception; }

    static Attempt attemptWith(String[] url, Properties props) {
        return (orderId, amount) -> {
            Recipes.Outcome[] got = new Recipes.Outcome[1];
            try (Connection conn = Recipes.connect(url[0], props)) {
                String outcome = Recipes.deliver(() -> got[0] = Recipes.charge(conn, orderId, amount));
                return new String[] {outcome, got[0] == null ? null : got[0].status(), got[0] == null ? null : got[0].result()};
            }
        };
    }

    /** Every order delivered 1 to 3 times at the same time; see deliveries_scenario in run_python.py. */
    static String scenario(int driverNo, Attempt attempt) throws Exception {
        long base = orderBase(driverNo);
        Map<Long, int[]> orders = new HashMap<>();
        List<Long> charged = new ArrayList<>();
        List<Long> deliveries = new ArrayList<>();
        for (int[] o : ORDERS) {
            orders.put(base + o[0], o);
            if (o[1] <= LIMIT) charged.add(base + o[0]);
            for (int i = 0; i < o[2]; i++) deliveries.add(base + o[0]);
        }
        Collections.shuffle(deliveries, new Random(driverNo));
        List<Object[]> answers = Collections.synchronizedList(new ArrayList<>());
        ExecutorService pool = Executors.newFixedThreadPool(deliveries.size());
        try (Connection holder = admin()) {
            holder.setAutoCommit(false);
            try (Statement st = holder.createStatement()) {
                st.execute("LOCK TABLE payments IN SHARE ROW EXCLUSIVE MODE");
            }
            List<Future<?>> running = new ArrayList<>();
            for (long id : deliveries) {
                running.add(pool.submit(() -> {
                    String[] got;
                    try {
                        got = attempt.run(id, orders.get(id)[1]);
                    } catch (Exception e) {
                        got = new String[] {"exception", null, e.toString()};
                    }
                    answers.add(new Object[] {id, got[0], got[1], got[2]});
                    return null;
                }));
            }
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60); // bounded
            while (System.nanoTime() < deadline) {
                long waiting = count("SELECT count(*) FROM pg_locks WHERE relation = 'payments'::regclass AND NOT granted");
                if (waiting == charged.size() && answers.size() == deliveries.size() - charged.size()) break;
                Thread.sleep(20);
            }
            holder.commit();
            for (Future<?> f : running) f.get(120, TimeUnit.SECONDS);
        } finally {
            pool.shutdownNow();
        }
        List<Object[]> firstWave = new ArrayList<>(answers);
        for (Object[] a : firstWave) {
            expect(a[1].equals("ack") || a[1].equals("retry"), "unexpected answer: " + java.util.Arrays.toString(a));
        }
        for (long id : charged) {
            List<Object> statuses = new ArrayList<>();
            for (Object[] a : firstWave) if (a[0].equals(id)) statuses.add(a[2]);
            expect(Collections.frequency(statuses, "started") == 1
                    && Collections.frequency(statuses, "in_progress") == statuses.size() - 1,
                "order " + id + ": first wave answered " + statuses + ", expected one started and the duplicates in_progress");
        }
        List<Long> pending = new ArrayList<>();
        for (Object[] a : firstWave) if (a[1].equals("retry")) pending.add((Long) a[0]);
        for (int round = 0; round < 50 && !pending.isEmpty(); round++) {
            List<Long> again = new ArrayList<>();
            for (long id : pending) {
                String[] got = attempt.run(id, orders.get(id)[1]);
                answers.add(new Object[] {id, got[0], got[1], got[2]});
                if (!got[0].equals("ack")) again.add(id);
            }
            pending = again;
            Thread.sleep(20);
        }
        expect(pending.isEmpty(), "never acknowledged: " + pending);
        Map<Long, Long> payment = new HashMap<>();
        try (Connection c = admin(); PreparedStatement ps = c.prepareStatement(
                "SELECT order_id, amount, id FROM payments WHERE order_id BETWEEN ? AND ?")) {
            ps.setLong(1, base);
            ps.setLong(2, base + 99);
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) {
                    long id = rs.getLong(1);
                    expect(!payment.containsKey(id), "order " + id + " paid twice");
                    expect(orders.containsKey(id) && rs.getInt(2) == orders.get(id)[1], "order " + id + ": payment of " + rs.getInt(2));
                    payment.put(id, rs.getLong(3));
                }
            }
        }
        expect(payment.keySet().equals(new java.util.HashSet<>(charged)), "payments of orders " + payment.keySet() + ", expected " + charged);
        for (Object[] a : answers) {
            long id = (Long) a[0];
            String status = (String) a[2];
            String result = (String) a[3];
            if ("started".equals(status) || "completed".equals(status)) {
                expect(("{\"payment_id\": " + payment.get(id) + "}").equals(result), "order " + id + ": " + status + " with " + result);
            } else if ("failed".equals(status)) {
                expect(orders.get(id)[1] > LIMIT && "{\"error\": \"amount_over_limit\", \"limit\": 10000}".equals(result),
                    "order " + id + ": failed with " + result);
            } else {
                expect("in_progress".equals(status) && "retry".equals(a[1]), "order " + id + ": " + a[1] + " " + status);
            }
        }
        for (Map.Entry<Long, int[]> o : orders.entrySet()) {
            List<Object> statuses = new ArrayList<>();
            for (Object[] a : answers) if (a[0].equals(o.getKey())) statuses.add(a[2]);
            expect(o.getValue()[1] <= LIMIT ? Collections.frequency(statuses, "started") == 1
                : Collections.frequency(statuses, "failed") == o.getValue()[2], "order " + o.getKey() + ": " + statuses);
        }
        long first = charged.get(0);
        String[] got = attempt.run(first, orders.get(first)[1] + 1);
        expect(got[0].equals("reject") && "mismatch".equals(got[1]), "another amount: " + java.util.Arrays.toString(got));
        List<Object> statuses = new ArrayList<>();
        for (Object[] a : answers) statuses.add(a[2]);
        return answers.size() + " deliveries of " + orders.size() + " orders: "
            + Collections.frequency(statuses, "started") + " started, " + Collections.frequency(statuses, "completed")
            + " completed, " + Collections.frequency(statuses, "failed") + " failed, "
            + Collections.frequency(statuses, "in_progress") + " in_progress";
    }

    /** One statement in a transaction of conn, through the recipe's deliver(). */
    static String provoke(String[] url, Properties props, String sql, String param) throws Exception {
        try (Connection conn = Recipes.connect(url[0], props)) {
            return Recipes.deliver(() -> {
                try (PreparedStatement ps = conn.prepareStatement(sql)) {
                    if (param != null) ps.setString(1, param);
                    ps.execute();
                    conn.commit();
                } catch (SQLException e) {
                    conn.rollback();
                    throw e;
                }
                return new Recipes.Outcome("started", null);
            });
        }
    }

    static void commonChecks(String label, int driverNo, String[] url, Properties props) {
        Attempt attempt = attemptWith(url, props);
        check(label + ": concurrent duplicate deliveries charge each order once", () -> scenario(driverNo, attempt));
        check(label + ": 42501 (the key belongs to another role) -> reject", () -> {
            long id = orderBase(driverNo) + 90; // claimed by drivers_other (setup.sql)
            String[] got = attempt.run(id, 100);
            expect(got[0].equals("reject") && got[1] == null, java.util.Arrays.toString(got));
            expect(count("SELECT count(*) FROM payments WHERE order_id = ?", id) == 0, "a payment was made");
            return null;
        });
        check(label + ": 40001 (a token no longer current) -> retry", () -> {
            String got = provoke(url, props, "SELECT idem_finish(key, NULL, '', token) FROM drivers_fixture WHERE name = 'stale'", null);
            expect(got.equals("retry"), got);
            return null;
        });
        check(label + ": 55000 (begun, neither finished nor failed) -> dead-letter", () -> {
            String key = uniqueKey(label + "-unfinished");
            String got = provoke(url, props, "SELECT status FROM idem_begin(?)", key);
            expect(got.equals("dead-letter"), got);
            expect(count("SELECT count(*) FROM idem_get(?)", key) == 0, "the key was stored");
            return null;
        });
    }

    static void jdbcChecks() throws Exception {
        System.out.println("RAN jdbc-charge");
        System.out.println("RAN jdbc-deliver");
        commonChecks("pgjdbc", 8, APP, user(APP));
        check("pgjdbc: a String needs ?::jsonb, or stringtype=unspecified; else 42883", () -> {
            String sql = "SELECT status FROM idem_begin(?, request => ?, lease => '1 second')";
            try (Connection conn = DriverManager.getConnection(APP[0], user(APP)); PreparedStatement ps = conn.prepareStatement(sql)) {
                ps.setString(1, uniqueKey("varchar"));
                ps.setString(2, "{\"amount\": 1}");
                SQLException e = expectState("42883", ps::executeQuery);
                expect(e.getMessage().contains("idem_begin(character varying, request => character varying"), e.getMessage());
            }
            Properties p = user(APP);
            p.setProperty("stringtype", "unspecified");
            try (Connection conn = DriverManager.getConnection(APP[0], p); PreparedStatement ps = conn.prepareStatement(sql)) {
                ps.setString(1, uniqueKey("unspecified"));
                ps.setString(2, "{\"amount\": 1}");
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    expect(rs.getString(1).equals("started"), rs.getString(1));
                }
            }
            return null;
        });
        check("pgjdbc: jsonb text has keys by length, then bytes", () -> {
            try (Connection conn = admin(); Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT '{\"bb\": 1, \"a\": {\"c\":2}, \"ab\": [1,\"x\"]}'::jsonb")) {
                rs.next();
                expect(rs.getString(1).equals("{\"a\": {\"c\": 2}, \"ab\": [1, \"x\"], \"bb\": 1}"), rs.getString(1));
            }
            return null;
        });
        check("pgjdbc: in autocommit (the default) a claim fails with 55000, a PSQLException", () -> {
            try (Connection conn = DriverManager.getConnection(APP[0], user(APP));
                 PreparedStatement ps = conn.prepareStatement("SELECT status FROM idem_begin(?)")) {
                expect(conn.getAutoCommit(), "not autocommit");
                ps.setString(1, uniqueKey("jdbc-auto"));
                SQLException e = expectState("55000", ps::executeQuery);
                expect(e instanceof org.postgresql.util.PSQLException, e.getClass().getName());
            }
            try (Connection conn = Recipes.connect(APP[0], user(APP));
                 PreparedStatement ps = conn.prepareStatement("SELECT status FROM idem_begin(?)")) {
                ps.setString(1, uniqueKey("jdbc-commit"));
                ps.executeQuery().close();
                SQLException e = expectState("55000", conn::commit);
                expect(e instanceof org.postgresql.util.PSQLException, e.getClass().getName());
            }
            return null;
        });
        check("pgjdbc: the other columns' types", () -> {
            String done = uniqueKey("response"), leased = uniqueKey("leased");
            try (Connection conn = Recipes.connect(APP[0], user(APP))) {
                try (PreparedStatement ps = conn.prepareStatement("SELECT status FROM idem_begin(?)")) {
                    ps.setString(1, done);
                    ps.executeQuery().close();
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT idem_finish(?, '{\"ok\": true}', "
                        + "response_status => 201, response_headers => '{\"content-type\": \"application/json\"}', "
                        + "response_body => '\\x7b7d')")) {
                    ps.setString(1, done);
                    ps.executeQuery().close();
                }
                conn.commit();
                conn.setAutoCommit(true);
                try (PreparedStatement ps = conn.prepareStatement("SELECT status FROM idem_begin(?, lease => '1 hour')")) {
                    ps.setString(1, leased);
                    ps.executeQuery().close();
                }
                try (PreparedStatement ps = conn.prepareStatement(
                        "SELECT token, response_status, response_headers, response_body, retry_after FROM idem_begin(?)")) {
                    ps.setString(1, done);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        rs.getLong("token");
                        expect(rs.wasNull(), "token not NULL");
                        expect(rs.getInt("response_status") == 201, "status");
                        expect(rs.getString("response_headers").equals("{\"content-type\": \"application/json\"}"), rs.getString("response_headers"));
                        expect(new String(rs.getBytes("response_body")).equals("{}"), "body");
                    }
                    ps.setString(1, leased);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        expect(rs.getString("retry_after").matches("00:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?"), rs.getString("retry_after"));
                        expect(rs.getObject("retry_after") instanceof org.postgresql.util.PGInterval, "PGInterval");
                    }
                }
                try (PreparedStatement ps = conn.prepareStatement("SELECT token FROM idem_begin(?, lease => '1 hour')")) {
                    ps.setString(1, uniqueKey("token"));
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        expect(rs.getLong("token") > 0 && !rs.wasNull(), "token");
                    }
                }
            }
            return null;
        });
    }

    static void bouncerChecks() throws Exception {
        System.out.println("RAN jdbc-charge");
        System.out.println("RAN jdbc-deliver");
        System.out.println("RAN pgbouncer-jdbc");
        String[] bouncer = jdbc(System.getenv("BOUNCER_URL"));
        String[] pool1 = jdbc(System.getenv("BOUNCER_POOL1_URL"));
        commonChecks("pgbouncer/pgjdbc", 12, bouncer, Recipes.throughPgbouncer(user(bouncer)));
        check("pgbouncer: pgjdbc is refused without ignore_startup_parameters = extra_float_digits", () -> {
            // pgbouncer's console: SET a setting for a moment, then back.
            // (pgjdbc logs a warning about its server version: quiet.)
            java.util.logging.Logger.getLogger("org.postgresql").setLevel(java.util.logging.Level.SEVERE);
            URI b = URI.create(System.getenv("BOUNCER_URL"));
            Properties console = user(ADMIN);
            console.setProperty("preferQueryMode", "simple");
            try (Connection c = DriverManager.getConnection("jdbc:postgresql://" + b.getHost() + ":" + b.getPort() + "/pgbouncer", console);
                 Statement st = c.createStatement()) {
                String before = null;
                try (ResultSet rs = st.executeQuery("SHOW CONFIG")) {
                    while (rs.next()) if (rs.getString("key").equals("ignore_startup_parameters")) before = rs.getString("value");
                }
                expect("extra_float_digits".equals(before), "ignore_startup_parameters = " + before);
                st.execute("SET ignore_startup_parameters = ''");
                try {
                    try {
                        DriverManager.getConnection(bouncer[0], user(bouncer)).close();
                        throw new AssertionError("pgbouncer accepted pgjdbc");
                    } catch (SQLException e) {
                        expect(e.getMessage().contains("unsupported startup parameter: extra_float_digits"), e.getMessage());
                    }
                } finally {
                    st.execute("SET ignore_startup_parameters = '" + before + "'");
                }
            }
            try (Connection conn = DriverManager.getConnection(bouncer[0], user(bouncer))) {
                expect(conn.isValid(5), "not valid");
            }
            return null;
        });
        check("pgbouncer: pgjdbc's default prepareThreshold fails (42P05), prepareThreshold=0 works", () -> {
            long base = orderBase(18);
            for (int pass = 0; pass < 2; pass++) {
                Properties props = pass == 0 ? user(pool1) : Recipes.throughPgbouncer(user(pool1));
                long first = base + pass * 40;
                try (Connection a = Recipes.connect(pool1[0], props); Connection b = Recipes.connect(pool1[0], props)) {
                    Action run = () -> {
                        for (int i = 1; i <= 30; i++) {
                            long id = first + i;
                            Connection conn = (i / 6) % 2 == 0 ? a : b;
                            String outcome = Recipes.deliver(() -> Recipes.charge(conn, id, 100));
                            expect(outcome.equals("ack"), "order " + id + ": " + outcome);
                        }
                    };
                    if (pass == 0) {
                        SQLException e = expectState("42P05", run);
                        expect(e.getMessage().contains("\"S_"), e.getMessage());
                    } else {
                        run.run();
                    }
                }
            }
            return null;
        });
    }

    public static void main(String[] args) throws Exception {
        try {
            switch (args[0]) {
                case "jdbc" -> jdbcChecks();
                case "pgbouncer-jdbc" -> bouncerChecks();
                default -> throw new IllegalArgumentException("no section " + args[0]);
            }
        } catch (Throwable e) {
            failed++;
            System.out.println("FAIL " + args[0] + ": the section stopped: " + e);
            e.printStackTrace(System.out);
        }
        System.exit(failed == 0 ? 0 : 1);
    }
}
